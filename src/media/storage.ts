// Where images are kept: one small interface, two backends chosen by MEDIA_STORAGE: files under
// MEDIA_DIR (local.storage.ts) or objects in an S3-compatible bucket (s3.storage.ts). Either way a
// write is all-or-nothing and never replaces a name: a name, once served, always means the same bytes.
// Output names (attempt-scoped, unguessable) are made here too.
import { randomBytes } from 'node:crypto';
import type { Readable } from 'node:stream';
import type { Config } from '../config.ts';
import type { Logger } from '../logger.ts';
import type { OutputFormat } from '../providers/provider.ts';
import { createLocalStorage } from './local.storage.ts';

export { createLocalStorage };

interface StorageOperations {
  /** Stores `data` under a new `name`; readers see either nothing or the whole file. Refuses an existing name (MediaExistsError). */
  write(name: string, data: Buffer): Promise<void>;
  /** Removes files (missing ones are fine). */
  remove(names: readonly string[]): Promise<void>;
  /** Temporary files older than `olderThanMs` (left by a crash mid-write), removed; returns how many. */
  removeStaleTemporaries(olderThanMs: number): Promise<number>;
  /** Names of stored files (not temporaries) last written more than `olderThanMs` ago. */
  listOlderThan(olderThanMs: number): Promise<string[]>;
  /** Releases connections (on shutdown). */
  close(): Promise<void>;
}

/** Files in a folder of this host: the API serves them from `dir` (sendFile: ETag, Last-Modified, 304, ranges). */
export interface LocalMediaStorage extends StorageOperations {
  readonly kind: 'local';
  readonly dir: string;
}

/** Objects in a bucket: the API streams what `read` returns, so result URLs stay the same. */
export interface ObjectMediaStorage extends StorageOperations {
  readonly kind: 's3';
  /** A stored file, 'not-modified' when the conditions say the client's copy is current, undefined when absent. */
  read(name: string, conditions: ReadConditions): Promise<StoredMedia | 'not-modified' | undefined>;
}

export type MediaStorage = LocalMediaStorage | ObjectMediaStorage;

export interface ReadConditions {
  ifNoneMatch?: string;
  ifModifiedSince?: Date;
}

export interface StoredMedia {
  body: Readable;
  bytes?: number;
  etag?: string;
  lastModified?: Date;
}

/** A write named a file that already exists (a served name never changes). */
export class MediaExistsError extends Error {
  constructor(name: string) {
    super(`media file ${name} already exists`);
    this.name = 'MediaExistsError';
  }
}

/** The storage could not be reached or refused the request (the attempt is retried; the API answers 503). */
export class MediaStorageError extends Error {
  constructor(message: string, options?: ErrorOptions) {
    super(message, options);
    this.name = 'MediaStorageError';
  }
}

export type StorageConfig = Pick<
  Config,
  'MEDIA_STORAGE' | 'MEDIA_DIR' | 'S3_BUCKET' | 'S3_PREFIX' | 'S3_ENDPOINT' | 'S3_REGION' | 'S3_ACCESS_KEY_ID' | 'S3_SECRET_ACCESS_KEY' | 'S3_FORCE_PATH_STYLE'
>;

/** The configured backend. The S3 client is loaded only when it is used. */
export async function createStorage(config: StorageConfig, logger: Logger): Promise<MediaStorage> {
  if (config.MEDIA_STORAGE === 's3') {
    const { createS3Storage } = await import('./s3.storage.ts');
    const storage = createS3Storage(config);
    logger.info({ bucket: config.S3_BUCKET, prefix: config.S3_PREFIX, endpoint: config.S3_ENDPOINT ?? 'aws' }, 'media stored in an S3 bucket');
    return storage;
  }
  return createLocalStorage(config.MEDIA_DIR);
}

/** The content type of a stored name, from its extension. */
export function contentTypeOf(name: string): string {
  const ext = /\.([a-z]+)$/.exec(name)?.[1];
  return ext && ext in contentTypes ? contentTypes[ext as OutputFormat] : 'application/octet-stream';
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
