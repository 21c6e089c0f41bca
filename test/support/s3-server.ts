// An S3-compatible server for tests: s3rver on loopback with one bucket, its objects in a temp folder.
// Middleware in front of it covers two gaps, each as narrowly as it can:
// - s3rver ignores `If-None-Match: *` on PUT (it overwrites): such a PUT is answered as S3 does (412
//   when the key exists or another conditional PUT of it is in flight), so the storage's refusal to
//   overwrite is tested against S3's documented behaviour, not assumed.
// - s3rver signs bucket-level requests (ListObjectsV2) as `/<bucket>` while the SDK signs the path it
//   sends, `/<bucket>/`: for those requests only, a signature mismatch is let through (the access key
//   is still checked); object requests keep full signature checks.
import { mkdtempSync, rmSync } from 'node:fs';
import { utimes } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import S3rver from '@20minutes/s3rver';

export interface TestS3 {
  endpoint: string;
  port: number;
  bucket: string;
  /** The settings that point the service at this bucket. */
  env: Record<string, string>;
  /** Sets an object's last-modified time (as if written then). */
  backdate(key: string, when: Date): Promise<void>;
  stop(): Promise<void>;
}

interface KoaContext {
  app: object;
  method: string;
  path: string;
  headers: Record<string, string | undefined>;
  status: number;
  type: string;
  body: unknown;
}

interface Store {
  existsObject(bucket: string, key: string): Promise<boolean>;
  getResourcePath(bucket: string, key: string, resource: string): string;
}

/** Starts the server (on `port`, or an ephemeral one). */
export async function startS3Server(options: { port?: number; bucket?: string; prefix?: string } = {}): Promise<TestS3> {
  const bucket = options.bucket ?? 'media-test';
  const directory = mkdtempSync(path.join(tmpdir(), 's3rver-'));
  const server = new S3rver({ address: '127.0.0.1', port: options.port ?? 0, silent: true, directory, configureBuckets: [{ name: bucket }] });
  const store = (server as unknown as { store: Store }).store;
  const inFlight = new Set<string>();
  const middleware = (server as unknown as { middleware: ((ctx: KoaContext, next: () => Promise<void>) => Promise<void>)[] }).middleware;
  middleware.unshift(async (ctx, next) => {
    if (/^\/[^/]+\/$/.test(ctx.path)) ctx.app = Object.create(ctx.app, { allowMismatchedSignatures: { value: true } }) as object;
    return next();
  });
  middleware.unshift(async (ctx, next) => {
    if (ctx.method !== 'PUT' || ctx.headers['if-none-match'] !== '*' || ctx.headers['x-amz-copy-source']) return next();
    const [, objectBucket, ...rest] = ctx.path.split('/');
    const key = decodeURIComponent(rest.join('/'));
    const id = `${objectBucket}/${key}`;
    const refuse = () => {
      ctx.status = 412;
      ctx.type = 'application/xml';
      ctx.body =
        '<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>PreconditionFailed</Code><Message>At least one of the pre-conditions you specified did not hold</Message><Condition>If-None-Match</Condition></Error>';
    };
    // Claimed before the first await: of two PUTs racing for a key, exactly one goes on.
    if (inFlight.has(id)) return refuse();
    inFlight.add(id);
    try {
      if (await store.existsObject(objectBucket, key)) return refuse();
      await next();
    } finally {
      inFlight.delete(id);
    }
  });
  const address = await server.run();
  const endpoint = `http://127.0.0.1:${address.port}`;
  return {
    endpoint,
    port: address.port,
    bucket,
    env: s3Env(endpoint, bucket, options.prefix),
    async backdate(key, when) {
      await utimes(store.getResourcePath(bucket, key, 'object'), when, when);
    },
    async stop() {
      await server.close();
      rmSync(directory, { recursive: true, force: true });
    },
  };
}

/** The service's settings for a bucket at `endpoint` (s3rver's fixed credentials). */
export function s3Env(endpoint: string, bucket: string, prefix?: string): Record<string, string> {
  return {
    MEDIA_STORAGE: 's3',
    S3_ENDPOINT: endpoint,
    S3_BUCKET: bucket,
    S3_REGION: 'us-east-1',
    S3_FORCE_PATH_STYLE: 'true',
    S3_ACCESS_KEY_ID: 'S3RVER',
    S3_SECRET_ACCESS_KEY: 'S3RVER',
    ...(prefix ? { S3_PREFIX: prefix } : {}),
  };
}
