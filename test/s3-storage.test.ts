// Media in an S3-compatible bucket (MEDIA_STORAGE=s3) against a real S3 server on loopback (s3rver,
// see support/s3-server.ts): whole jobs, API and worker on "different hosts", no overwrite, stray
// removal, an unreachable bucket. The bucket is read back with the AWS SDK directly, not through the
// service, as the oracle for what was stored.
import { readdirSync, readFileSync } from 'node:fs';
import { GetObjectCommand, ListObjectsV2Command, PutObjectCommand, S3Client } from '@aws-sdk/client-s3';
import sharp from 'sharp';
import { parse } from 'yaml';
import { parseConfig } from '../src/config.ts';
import { listAttempts } from '../src/jobs/job.repository.ts';
import { createLogger } from '../src/logger.ts';
import { createStorage, MediaExistsError, type MediaStorage } from '../src/media/storage.ts';
import { removeStrayOutputs } from '../src/worker/maintenance.handler.ts';
import { createTestDatabase, startTestService, submit, testConfig, waitFor, waitForStatus, type StatusBody, type TestService } from './support/harness.ts';
import { mediaPath } from './support/media-names.ts';
import { freePort } from './support/service-process.ts';
import { s3Env, startS3Server, type TestS3 } from './support/s3-server.ts';

const PREFIX = 'outputs';
const logger = createLogger('silent');
const started: { stop(): Promise<void> }[] = [];
const clients: S3Client[] = [];

afterEach(async () => {
  for (const client of clients.splice(0)) client.destroy();
  for (const s of started.splice(0).reverse()) await s.stop();
});

async function s3Server(options: { port?: number } = {}): Promise<TestS3> {
  const server = await startS3Server({ prefix: `${PREFIX}/`, ...options });
  started.push(server);
  return server;
}

async function service(options: Parameters<typeof startTestService>[0]): Promise<TestService> {
  const svc = await startTestService(options);
  started.push(svc);
  return svc;
}

/** A plain SDK client on the test server: the oracle for what the bucket holds. */
function bucketClient(s3: TestS3): S3Client {
  const client = new S3Client({
    endpoint: s3.endpoint,
    region: 'us-east-1',
    forcePathStyle: true,
    credentials: { accessKeyId: 'S3RVER', secretAccessKey: 'S3RVER' },
    requestChecksumCalculation: 'WHEN_REQUIRED',
    responseChecksumValidation: 'WHEN_REQUIRED',
  });
  clients.push(client);
  return client;
}

async function storedBytes(s3: TestS3, name: string): Promise<Buffer> {
  const object = await bucketClient(s3).send(new GetObjectCommand({ Bucket: s3.bucket, Key: `${PREFIX}/${name}` }));
  return Buffer.from(await object.Body!.transformToByteArray());
}

async function storedNames(s3: TestS3): Promise<string[]> {
  const listed = await bucketClient(s3).send(new ListObjectsV2Command({ Bucket: s3.bucket }));
  return (listed.Contents ?? []).map((o) => o.Key!).sort();
}

async function jobIdOf(res: Response): Promise<string> {
  expect(res.status).toBe(202);
  return ((await res.json()) as { job_id: string }).job_id;
}

const nameOf = (url: string) => url.replace(/^\/media\//, '');

/** GETs a media URL and checks it is exactly what the bucket holds, with the content type of `format`. */
async function expectServedFromBucket(s3: TestS3, baseUrl: string, url: string, format: 'png' | 'webp' | 'jpeg'): Promise<Response> {
  const res = await fetch(`${baseUrl}${url}`);
  expect(res.status).toBe(200);
  expect(res.headers.get('content-type')).toBe(`image/${format}`);
  expect(res.headers.get('cache-control')).toMatch(/^private\b/);
  const body = Buffer.from(await res.arrayBuffer());
  expect(body.equals(await storedBytes(s3, nameOf(url)))).toBe(true);
  expect((await sharp(body).metadata()).format).toBe(format);
  return res;
}

test('a whole job with MEDIA_STORAGE=s3: outputs and thumbnails land in the bucket, the API serves them at the same URLs (conditional GETs too), nothing touches MEDIA_DIR', async () => {
  const s3 = await s3Server();
  const svc = await service({ env: s3.env });
  const id = await jobIdOf(
    await submit(svc.baseUrl, { prompt: 'a lighthouse in a bucket', parameters: { width: 320, height: 200, output_format: 'webp', num_outputs: 2 } }),
  );
  const done = await waitForStatus(svc.baseUrl, id, ['completed', 'failed']);
  expect(done.status).toBe('completed');
  expect(done.result_url).toMatch(mediaPath(id, 1, 'webp'));
  const outputs = done.outputs as (StatusBody['outputs'][number] & { thumbnail_url: string })[];
  expect(outputs).toHaveLength(2);

  for (const output of outputs) {
    const res = await expectServedFromBucket(s3, svc.baseUrl, output.url, 'webp');
    const served = await storedBytes(s3, nameOf(output.url));
    expect(await sharp(served).metadata()).toMatchObject({ width: 320, height: 200 });
    expect(served.length).toBe(output.bytes);
    await expectServedFromBucket(s3, svc.baseUrl, output.thumbnail_url, 'webp');

    const etag = res.headers.get('etag');
    expect(etag).toBeTruthy();
    expect((await fetch(`${svc.baseUrl}${output.url}`, { headers: { 'if-none-match': etag! } })).status).toBe(304);
    const lastModified = res.headers.get('last-modified');
    expect((await fetch(`${svc.baseUrl}${output.url}`, { headers: { 'if-modified-since': lastModified! } })).status).toBe(304);
  }
  const names = outputs.flatMap((o) => [o.url, o.thumbnail_url].map((u) => `${PREFIX}/${nameOf(u)}`));
  expect(await storedNames(s3)).toEqual(names.sort());
  expect(readdirSync(svc.config.MEDIA_DIR)).toEqual([]);
  // a name the bucket does not hold is a 404, as with local files
  expect((await fetch(`${svc.baseUrl}/media/${id}-9-${'0'.repeat(32)}.png`)).status).toBe(404);
});

test('API and worker on different hosts, sharing nothing but Postgres and the bucket: the API serves what the worker stored', async () => {
  const s3 = await s3Server();
  const databaseUrl = await createTestDatabase();
  const api = await service({ databaseUrl, worker: false, env: s3.env });
  const worker = await service({ databaseUrl, api: false, env: s3.env });
  expect(api.config.MEDIA_DIR).not.toBe(worker.config.MEDIA_DIR);

  const id = await jobIdOf(await submit(api.baseUrl, { prompt: 'two hosts', parameters: { width: 256, height: 256 } }));
  const done = await waitForStatus(api.baseUrl, id, ['completed', 'failed']);
  expect(done.status).toBe('completed');
  await expectServedFromBucket(s3, api.baseUrl, done.result_url!, 'png');
  await expectServedFromBucket(s3, api.baseUrl, (done.outputs[0] as unknown as { thumbnail_url: string }).thumbnail_url, 'webp');
  expect(readdirSync(api.config.MEDIA_DIR)).toEqual([]);
  expect(readdirSync(worker.config.MEDIA_DIR)).toEqual([]);
});

describe('the S3 backend itself', () => {
  let s3: TestS3;
  let storage: MediaStorage;
  beforeEach(async () => {
    s3 = await s3Server();
    storage = await createStorage(testConfig(s3.env), logger);
    started.push({ stop: () => storage.close() });
  });

  test('refuses to replace a stored name (If-None-Match: *), also when two writers race for it', async () => {
    const name = `00000000-0000-4000-8000-000000000001-1-${'a'.repeat(32)}.png`;
    await storage.write(name, Buffer.from('first'));
    await expect(storage.write(name, Buffer.from('second'))).rejects.toBeInstanceOf(MediaExistsError);
    expect((await storedBytes(s3, name)).toString()).toBe('first');

    const raced = `00000000-0000-4000-8000-000000000001-2-${'b'.repeat(32)}.png`;
    const results = await Promise.allSettled([storage.write(raced, Buffer.from('one')), storage.write(raced, Buffer.from('two'))]);
    const won = results.findIndex((r) => r.status === 'fulfilled');
    expect(results.filter((r) => r.status === 'fulfilled')).toHaveLength(1);
    expect((results[1 - won] as PromiseRejectedResult).reason).toBeInstanceOf(MediaExistsError);
    expect((await storedBytes(s3, raced)).toString()).toBe(won === 0 ? 'one' : 'two');
  });

  test('has no temporaries (a PUT is atomic), lists only its own prefix, and removes names (missing ones are fine)', async () => {
    const name = `00000000-0000-4000-8000-000000000002-1-${'c'.repeat(32)}.png`;
    await storage.write(name, Buffer.from('x'));
    await bucketClient(s3).send(new PutObjectCommand({ Bucket: s3.bucket, Key: 'elsewhere/not-ours.png', Body: 'y' }));
    expect(await storage.removeStaleTemporaries(0)).toBe(0);
    await s3.backdate(`${PREFIX}/${name}`, new Date(Date.now() - 60_000));
    expect(await storage.listOlderThan(30_000)).toEqual([name]);
    expect(await storage.listOlderThan(120_000)).toEqual([]);
    await storage.remove([name, `00000000-0000-4000-8000-000000000002-1-${'d'.repeat(32)}.png`]);
    expect(await storedNames(s3)).toEqual(['elsewhere/not-ours.png']);
  });
});

test('maintenance removes stray outputs from the bucket (a worker died after writing), and nothing else', async () => {
  const s3 = await s3Server();
  const svc = await service({ env: s3.env });
  const id = await jobIdOf(await submit(svc.baseUrl, { prompt: 'kept in the bucket' }));
  const done = await waitForStatus(svc.baseUrl, id, ['completed']);
  const served = await storedNames(s3);
  expect(served).toHaveLength(2);
  const strayOfJob = `${id}-1-${'a'.repeat(32)}.png`; // an attempt that wrote but never completed the job
  const strayOfNobody = `00000000-0000-4000-8000-000000000000-1-${'b'.repeat(32)}.thumb.webp`;
  const young = `${id}-1-${'c'.repeat(32)}.png`; // may still be in the hands of a running attempt
  for (const name of [strayOfJob, strayOfNobody, young]) {
    await bucketClient(s3).send(new PutObjectCommand({ Bucket: s3.bucket, Key: `${PREFIX}/${name}`, Body: 'x' }));
  }
  const twoHoursAgo = new Date(Date.now() - 2 * 3600_000);
  for (const key of [...served, `${PREFIX}/${strayOfJob}`, `${PREFIX}/${strayOfNobody}`]) await s3.backdate(key, twoHoursAgo);

  const storage = await createStorage(testConfig(s3.env), logger);
  try {
    expect(await removeStrayOutputs(svc.db, storage)).toBe(2);
  } finally {
    await storage.close();
  }
  expect(await storedNames(s3)).toEqual([...served, `${PREFIX}/${young}`].sort());
  await expectServedFromBucket(s3, svc.baseUrl, done.result_url!, 'png');
});

test('an unreachable bucket fails the attempt retryably (the worker lives on) and the API answers 503; once it is back, the retry completes the job', async () => {
  const port = await freePort();
  const env = { ...s3Env(`http://127.0.0.1:${port}`, 'media-test', `${PREFIX}/`), JOB_RETRY_LIMIT: '5' };
  const svc = await service({ env });
  const id = await jobIdOf(await submit(svc.baseUrl, { prompt: 'bucket down' }));
  const [first] = await waitFor(async () => {
    const attempts = await listAttempts(svc.db, id);
    return attempts[0]?.outcome === 'failed' ? attempts : undefined;
  }, 'the first attempt to fail');
  expect(first.error).toMatch(/media storage: could not store .* \(ECONNREFUSED\)/);
  expect(first.error).not.toContain(String(port)); // the bucket's address stays out of what clients see

  const media = await fetch(`${svc.baseUrl}/media/${id}-1-${'e'.repeat(32)}.png`);
  expect(media.status).toBe(503);
  expect(media.headers.get('content-type')).toMatch(/^application\/problem\+json/);
  expect(media.headers.get('retry-after')).toBeTruthy();

  const s3 = await s3Server({ port });
  const done = await waitForStatus(svc.baseUrl, id, ['completed', 'failed'], 60_000);
  expect(done.status).toBe('completed');
  expect(done.attempts).toBeGreaterThan(1);
  await expectServedFromBucket(s3, svc.baseUrl, done.result_url!, 'png');
});

test('configuration: MEDIA_STORAGE=s3 needs a bucket, static credentials come in pairs, and the secret stays out of errors and logs', () => {
  expect(() => parseConfig({ MEDIA_STORAGE: 's3' })).toThrow(/S3_BUCKET: required when MEDIA_STORAGE=s3/);
  expect(() => parseConfig({ MEDIA_STORAGE: 's3', S3_BUCKET: 'media', S3_SECRET_ACCESS_KEY: 'hush-hush-secret' })).toThrow(
    /S3_ACCESS_KEY_ID: S3_ACCESS_KEY_ID and S3_SECRET_ACCESS_KEY go together/,
  );
  let message = '';
  try {
    parseConfig({ MEDIA_STORAGE: 's3', S3_BUCKET: 'media', S3_SECRET_ACCESS_KEY: 'hush-hush-secret', S3_ENDPOINT: 'not a url' });
  } catch (err) {
    message = (err as Error).message;
  }
  expect(message).toMatch(/S3_ACCESS_KEY_ID/);
  expect(message).toMatch(/S3_ENDPOINT/);
  expect(message).not.toContain('hush-hush-secret');

  const config = parseConfig({ MEDIA_STORAGE: 's3', S3_BUCKET: 'media', S3_ACCESS_KEY_ID: 'AKIDEXAMPLE', S3_SECRET_ACCESS_KEY: 'hush-hush-secret' });
  const lines: string[] = [];
  createLogger('info', {}, { write: (line: string) => lines.push(line) }).info({ config }, 'configuration');
  expect(lines.join('')).toContain('AKIDEXAMPLE');
  expect(lines.join('')).not.toContain('hush-hush-secret');
});

test('the compose object-storage variant (docker-compose.s3.yml) points migrate, api and worker at the bucket it creates, with settings the config accepts', () => {
  const read = (file: string) => readFileSync(new URL(`../${file}`, import.meta.url), 'utf8');
  const text = read('docker-compose.s3.yml');
  const override = parse(text, { merge: true }) as {
    services: Record<string, { environment?: Record<string, string>; depends_on?: Record<string, { condition: string }> }>;
  };
  for (const name of ['migrate', 'api', 'worker']) {
    const env = override.services[name].environment!;
    expect(env).toMatchObject({ MEDIA_STORAGE: 's3', S3_ENDPOINT: 'http://minio:9000', S3_FORCE_PATH_STYLE: 'true' });
    // what the containers get once compose has filled in the defaults
    const filled = Object.fromEntries(Object.entries(env).map(([k, v]) => [k, v.replace(/\$\{[A-Z0-9_]+:-([^}]*)\}/g, '$1')]));
    expect(parseConfig(filled)).toMatchObject({ MEDIA_STORAGE: 's3', S3_BUCKET: 'media' });
  }
  for (const name of ['api', 'worker']) expect(override.services[name].depends_on).toEqual({ bucket: { condition: 'service_completed_successfully' } });
  expect(override.services.bucket.depends_on).toEqual({ minio: { condition: 'service_healthy' } });
  const used = new Set([...text.matchAll(/\$\{([A-Z][A-Z0-9_]*)/g)].map((m) => m[1]));
  const documented = new Set([...read('.env.example').matchAll(/^#?\s*([A-Z][A-Z0-9_]*)=/gm)].map((m) => m[1]));
  expect([...used].filter((v) => !documented.has(v))).toEqual([]);
});
