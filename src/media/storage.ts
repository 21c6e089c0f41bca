// Where images are kept: files under MEDIA_DIR, written atomically (temporary name, then linked into
// place) and never overwritten: a name, once served, always means the same bytes.
import { randomBytes } from 'node:crypto';
import { link, mkdir, readdir, rm, stat, unlink, writeFile } from 'node:fs/promises';
import path from 'node:path';
import type { OutputFormat } from '../providers/provider.ts';

export interface MediaStorage {
  readonly dir: string;
  /** Stores `data` under a new `name`; readers see either nothing or the whole file. Refuses an existing name. */
  write(name: string, data: Buffer): Promise<void>;
  /** Removes files (missing ones are fine). */
  remove(names: readonly string[]): Promise<void>;
  /** Temporary files older than `olderThanMs` (left by a crash mid-write), removed; returns how many. */
  removeStaleTemporaries(olderThanMs: number): Promise<number>;
  /** Names of stored files (not temporaries) last written more than `olderThanMs` ago. */
  listOlderThan(olderThanMs: number): Promise<string[]>;
}

const TEMP_PREFIX = '.tmp-';

export async function createLocalStorage(dir: string): Promise<MediaStorage> {
  const root = path.resolve(dir);
  await mkdir(root, { recursive: true });
  return {
    dir: root,
    async write(name, data) {
      const target = path.join(root, path.basename(name));
      const temp = path.join(root, `${TEMP_PREFIX}${randomBytes(6).toString('hex')}-${path.basename(name)}`);
      try {
        await writeFile(temp, data, { flush: true });
        // link(), unlike rename(), fails when the target exists: nothing can replace a served file.
        await link(temp, target);
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

/** The job and attempt a stored file belongs to, read from its name; undefined for other names. */
export function ownerOfFile(name: string): { jobId: string; attempt: number } | undefined {
  const match = /^([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})-([0-9]{1,3})-[0-9a-f]{32}/.exec(name);
  return match ? { jobId: match[1], attempt: Number(match[2]) } : undefined;
}

/** A 128-bit random token per attempt: it scopes the attempt's file names and makes them unguessable. */
export function newAttemptToken(): string {
  return randomBytes(16).toString('hex');
}

/**
 * The file name of output `index` of one attempt of a job: `<job_id>-<attempt>-<token>.<ext>` for the
 * first output, `<job_id>-<attempt>-<token>-<index>.<ext>` after. Two attempts never share a name.
 */
export function mediaFileName(jobId: string, attempt: number, token: string, index: number, format: OutputFormat): string {
  return `${outputStem(jobId, attempt, token, index)}.${format}`;
}

/** The thumbnail of that output: the same stem, `.thumb.webp`. */
export function thumbnailFileName(jobId: string, attempt: number, token: string, index: number): string {
  return `${outputStem(jobId, attempt, token, index)}.thumb.webp`;
}

function outputStem(jobId: string, attempt: number, token: string, index: number): string {
  return index === 0 ? `${jobId}-${attempt}-${token}` : `${jobId}-${attempt}-${token}-${index}`;
}

export const contentTypes: Record<OutputFormat, string> = { png: 'image/png', webp: 'image/webp', jpeg: 'image/jpeg' };
