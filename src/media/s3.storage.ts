// Media in an S3-compatible bucket (AWS S3, MinIO, R2, …), so that API and workers on different hosts
// share it. A PUT is atomic (an object appears whole or not at all), so there are no temporaries; it is
// conditional (`If-None-Match: *`), so a name is never replaced on servers that honour the condition.
import { Readable } from 'node:stream';
import { DeleteObjectCommand, GetObjectCommand, paginateListObjectsV2, PutObjectCommand, S3Client } from '@aws-sdk/client-s3';
import { contentTypeOf, MediaExistsError, MediaStorageError, type ObjectMediaStorage, type StorageConfig } from './storage.ts';

/** Deletions in flight at once (one request per name: DeleteObjects is missing from some S3-compatible servers). */
const DELETE_CONCURRENCY = 16;

export function createS3Storage(config: StorageConfig): ObjectMediaStorage {
  const bucket = config.S3_BUCKET;
  if (!bucket) throw new Error('S3_BUCKET is required when MEDIA_STORAGE=s3');
  const prefix = (config.S3_PREFIX ?? '').replace(/^\/+|\/+$/g, '');
  const keyOf = (name: string) => (prefix ? `${prefix}/${name}` : name);
  const listPrefix = prefix ? `${prefix}/` : '';
  const client = new S3Client({
    region: config.S3_REGION,
    ...(config.S3_ENDPOINT ? { endpoint: config.S3_ENDPOINT } : {}),
    forcePathStyle: config.S3_FORCE_PATH_STYLE,
    // Unset: the SDK's own chain (AWS_* variables, shared config, instance or task role).
    ...(config.S3_ACCESS_KEY_ID && config.S3_SECRET_ACCESS_KEY
      ? { credentials: { accessKeyId: config.S3_ACCESS_KEY_ID, secretAccessKey: config.S3_SECRET_ACCESS_KEY } }
      : {}),
    // Checksums only where an operation requires one: S3-compatible servers often refuse the SDK's
    // default (flexible) checksum headers.
    requestChecksumCalculation: 'WHEN_REQUIRED',
    responseChecksumValidation: 'WHEN_REQUIRED',
    // A bucket that does not answer fails the attempt (which is retried) instead of holding its slot.
    requestHandler: { connectionTimeout: 5_000, requestTimeout: 30_000 },
  });

  return {
    kind: 's3',
    async write(name, data) {
      checkName(name);
      try {
        await client.send(new PutObjectCommand({ Bucket: bucket, Key: keyOf(name), Body: data, ContentType: contentTypeOf(name), IfNoneMatch: '*' }));
      } catch (err) {
        if (statusOf(err) === 412) throw new MediaExistsError(name);
        throw storageError(`could not store ${name}`, err);
      }
    },
    async remove(names) {
      const queue = [...names];
      const deleteNext = async (): Promise<void> => {
        for (let name = queue.shift(); name !== undefined; name = queue.shift()) {
          if (!isStoredName(name)) continue;
          try {
            await client.send(new DeleteObjectCommand({ Bucket: bucket, Key: keyOf(name) }));
          } catch (err) {
            if (statusOf(err) !== 404) throw storageError(`could not remove ${name}`, err);
          }
        }
      };
      await Promise.all(Array.from({ length: Math.min(DELETE_CONCURRENCY, queue.length) }, deleteNext));
    },
    // Puts are atomic: an interrupted one leaves nothing behind.
    removeStaleTemporaries: () => Promise.resolve(0),
    async listOlderThan(olderThanMs) {
      const cutoff = Date.now() - olderThanMs;
      const names: string[] = [];
      try {
        for await (const page of paginateListObjectsV2({ client, pageSize: 1000 }, { Bucket: bucket, Prefix: listPrefix })) {
          for (const object of page.Contents ?? []) {
            const name = object.Key?.slice(listPrefix.length);
            if (name && isStoredName(name) && object.LastModified && object.LastModified.getTime() < cutoff) names.push(name);
          }
        }
      } catch (err) {
        throw storageError('could not list the bucket', err);
      }
      return names;
    },
    async read(name, conditions) {
      if (!isStoredName(name)) return undefined;
      try {
        const object = await client.send(
          new GetObjectCommand({ Bucket: bucket, Key: keyOf(name), IfNoneMatch: conditions.ifNoneMatch, IfModifiedSince: conditions.ifModifiedSince }),
        );
        if (!(object.Body instanceof Readable)) throw new Error('the S3 client returned no stream');
        return { body: object.Body, bytes: object.ContentLength, etag: object.ETag, lastModified: object.LastModified };
      } catch (err) {
        if (statusOf(err) === 304) return 'not-modified';
        if ((err as Error).name === 'NoSuchKey') return undefined;
        throw storageError(`could not read ${name}`, err);
      }
    },
    close: () => Promise.resolve(client.destroy()),
  };
}

/** Names this service writes: one path segment of safe characters (no `/`, no dot segments). */
function isStoredName(name: string): boolean {
  return /^[\w-][\w.-]*$/.test(name) && !name.includes('..');
}

function checkName(name: string): void {
  if (!isStoredName(name)) throw new Error(`not a media file name: ${name}`);
}

function statusOf(err: unknown): number | undefined {
  return (err as { $metadata?: { httpStatusCode?: number } } | undefined)?.$metadata?.httpStatusCode;
}

/**
 * A storage failure, said without the endpoint's address (the message reaches the job's `error`):
 * the S3 error code or the network error code; the cause keeps the rest for the logs.
 */
function storageError(what: string, err: unknown): MediaStorageError {
  const e = err as { name?: string; code?: string; Code?: string; message?: string } | undefined;
  // A network error from another realm (a test VM) reaches us wrapped, its code only in the message.
  const code = e?.Code ?? e?.code ?? (e?.name && e.name !== 'Error' ? e.name : /\bE[A-Z]{3,}\b/.exec(e?.message ?? '')?.[0]) ?? 'unknown error';
  return new MediaStorageError(`media storage: ${what} (${code})`, { cause: err });
}
