// Where images are kept: files under MEDIA_DIR, written atomically (temporary name, then rename).
import { randomBytes } from 'node:crypto';
import { mkdir, rename, rm, writeFile } from 'node:fs/promises';
import path from 'node:path';
import type { OutputFormat } from '../providers/provider.ts';

export interface MediaStorage {
  readonly dir: string;
  /** Stores `data` under `name`; readers see either nothing or the whole file. */
  write(name: string, data: Buffer): Promise<void>;
}

export async function createLocalStorage(dir: string): Promise<MediaStorage> {
  const root = path.resolve(dir);
  await mkdir(root, { recursive: true });
  return {
    dir: root,
    async write(name, data) {
      const target = path.join(root, path.basename(name));
      const temp = path.join(root, `.tmp-${randomBytes(6).toString('hex')}-${path.basename(name)}`);
      try {
        await writeFile(temp, data, { flush: true });
        await rename(temp, target);
      } catch (err) {
        await rm(temp, { force: true });
        throw err;
      }
    },
  };
}

/** The file name of output `index` of a job: `<job_id>.<ext>` for the first, `<job_id>-<index>.<ext>` after. */
export function mediaFileName(jobId: string, index: number, format: OutputFormat): string {
  return index === 0 ? `${jobId}.${format}` : `${jobId}-${index}.${format}`;
}

/** The thumbnail of output `index`: `<job_id>[-<index>].thumb.webp`. */
export function thumbnailFileName(jobId: string, index: number): string {
  return index === 0 ? `${jobId}.thumb.webp` : `${jobId}-${index}.thumb.webp`;
}

export const contentTypes: Record<OutputFormat, string> = { png: 'image/png', webp: 'image/webp', jpeg: 'image/jpeg' };
