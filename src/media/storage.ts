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
      let removed = 0;
      for (const name of await readdir(root)) {
        if (!name.startsWith(TEMP_PREFIX)) continue;
        const file = path.join(root, name);
        const info = await stat(file).catch(() => undefined);
        if (info && Date.now() - info.mtimeMs > olderThanMs) {
          await unlink(file).catch(() => {});
          removed++;
        }
      }
      return removed;
    },
  };
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
