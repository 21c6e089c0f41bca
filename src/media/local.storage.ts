// The default media storage: files under MEDIA_DIR, written atomically (temporary name, then linked
// into place) and never overwritten: a name, once served, always means the same bytes.
import { randomBytes } from 'node:crypto';
import { link, mkdir, readdir, rm, stat, unlink, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { MediaExistsError, type LocalMediaStorage } from './storage.ts';

const TEMP_PREFIX = '.tmp-';

export async function createLocalStorage(dir: string): Promise<LocalMediaStorage> {
  const root = path.resolve(dir);
  await mkdir(root, { recursive: true });
  return {
    kind: 'local',
    dir: root,
    async write(name, data) {
      const target = path.join(root, path.basename(name));
      const temp = path.join(root, `${TEMP_PREFIX}${randomBytes(6).toString('hex')}-${path.basename(name)}`);
      try {
        await writeFile(temp, data, { flush: true });
        // link(), unlike rename(), fails when the target exists: nothing can replace a served file.
        await link(temp, target).catch((err: unknown) => {
          throw (err as NodeJS.ErrnoException).code === 'EEXIST' ? new MediaExistsError(name) : err;
        });
      } finally {
        await rm(temp, { force: true });
      }
    },
    async remove(names) {
      await Promise.all(names.map((name) => rm(path.join(root, path.basename(name)), { force: true })));
    },
    async removeStaleTemporaries(olderThanMs) {
      const stale = await olderThan(root, olderThanMs, (name) => name.startsWith(TEMP_PREFIX));
      await Promise.all(stale.map((name) => unlink(path.join(root, name)).catch(() => {})));
      return stale.length;
    },
    listOlderThan: (olderThanMs) => olderThan(root, olderThanMs, (name) => !name.startsWith(TEMP_PREFIX)),
    close: () => Promise.resolve(),
  };
}

async function olderThan(root: string, olderThanMs: number, wanted: (name: string) => boolean): Promise<string[]> {
  const found: string[] = [];
  for (const name of await readdir(root)) {
    if (!wanted(name)) continue;
    const info = await stat(path.join(root, name)).catch(() => undefined);
    if (info?.isFile() && Date.now() - info.mtimeMs > olderThanMs) found.push(name);
  }
  return found;
}
