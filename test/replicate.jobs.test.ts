// Whole jobs through the Replicate provider against the local Replicate: what a client sees in
// /status for success, rate limits, refusals, outages and time-outs.
import { listAttempts } from '../src/jobs/job.repository.ts';
import { probeImage } from '../src/media/normalize.ts';
import { startLocalReplicate, type LocalReplicate } from './support/local-replicate.ts';
import { mediaPath } from './support/media-names.ts';
import { createTestDatabase, startTestService, submit, waitFor, waitForStatus, type TestService } from './support/harness.ts';

let replicate: LocalReplicate;
let svc: TestService | undefined;
let databaseUrl: string;

beforeAll(async () => {
  databaseUrl = await createTestDatabase();
});
beforeEach(async () => {
  replicate = await startLocalReplicate();
});
afterEach(async () => {
  await svc?.stop();
  svc = undefined;
  await replicate.close();
});

async function start(env: Record<string, string> = {}) {
  svc = await startTestService({
    databaseUrl,
    env: {
      REPLICATE_API_TOKEN: replicate.token,
      REPLICATE_BASE_URL: replicate.baseUrl,
      REPLICATE_DOWNLOAD_HOSTS: `replicate.delivery,${replicate.origin}`,
      REPLICATE_POLL_INTERVAL_MS: '20',
      REPLICATE_WAIT_SECONDS: '1',
      ...env,
    },
  });
  return svc;
}

async function run(body: unknown): Promise<{ id: string; status: Awaited<ReturnType<typeof waitForStatus>> }> {
  const res = await submit(svc!.baseUrl, body);
  expect(res.status).toBe(202);
  const id = ((await res.json()) as { job_id: string }).job_id;
  return { id, status: await waitForStatus(svc!.baseUrl, id, ['completed', 'failed'], 30_000) };
}

test('a job completes through Replicate: exact size, prediction id and predict time recorded', async () => {
  await start();
  replicate.setScenario({ predictTime: 2.5 });
  const { id, status } = await run({ prompt: 'A futuristic city at sunset', parameters: '{"width":768,"height":512,"seed":3}' });
  expect(status).toMatchObject({ status: 'completed', provider: 'replicate', attempts: 1, prediction_id: expect.any(String) });
  const image = Buffer.from(await (await fetch(`${svc!.baseUrl}${status.result_url}`)).arrayBuffer());
  expect(await probeImage(image)).toEqual({ width: 768, height: 512, format: 'png' });
  const [create] = replicate.requestsOf('create');
  expect(create.path).toBe('/v1/models/black-forest-labs/flux-schnell/predictions');
  expect(create.body).toMatchObject({ input: { prompt: 'A futuristic city at sunset', aspect_ratio: '3:2', seed: 3, output_format: 'png', num_outputs: 1 } });
  const [attempt] = await listAttempts(svc!.db, id);
  expect(attempt).toMatchObject({ outcome: 'succeeded', prediction_id: status.prediction_id, predict_time_ms: 2500 });
});

test('a job survives a burst of 429s without spending its retries', async () => {
  await start();
  replicate.faults.push({ kind: 'rate-limit', route: 'create', count: 4, retryAfter: 0.2 });
  const { status } = await run({ prompt: 'throttled' });
  expect(status).toMatchObject({ status: 'completed', attempts: 1 });
  expect(replicate.requestsOf('create').filter((r) => r.status === 429)).toHaveLength(4);
});

test('a content-policy failure fails the job at once with the provider message', async () => {
  await start();
  replicate.setScenario({ outcome: { failed: 'All generated images contained NSFW content. Try running it again with a different prompt.' } });
  const { id, status } = await run({ prompt: 'refused' });
  expect(status).toMatchObject({ status: 'failed', attempts: 1 });
  expect(status.error).toMatch(/NSFW content/);
  expect(replicate.requestsOf('create')).toHaveLength(1);
  expect((await listAttempts(svc!.db, id))[0]).toMatchObject({ error_kind: 'permanent', prediction_id: expect.any(String) });
});

test('a bad token fails the job at once, and the token appears nowhere in /status', async () => {
  await start({ REPLICATE_API_TOKEN: 'r8_wrong_token_zzzzzzzz' });
  const { status } = await run({ prompt: 'unauthorised' });
  expect(status).toMatchObject({ status: 'failed', attempts: 1 });
  expect(status.error).toMatch(/401|auth|token/i);
  expect(JSON.stringify(status)).not.toContain('r8_wrong_token_zzzzzzzz');
});

test('an outage of Replicate (5xx on create) is retried by the queue and then completes', async () => {
  await start({ JOB_RETRY_DELAY_SECONDS: '1' });
  replicate.faults.push({ kind: 'server-error', route: 'create', count: 1, status: 503 });
  const { id, status } = await run({ prompt: 'after the outage' });
  expect(status).toMatchObject({ status: 'completed', attempts: 2 });
  const attempts = await listAttempts(svc!.db, id);
  expect(attempts.map((a) => [a.outcome, a.error_kind])).toEqual([
    ['failed', 'retryable'],
    ['succeeded', null],
  ]);
  expect(attempts[0].error).toMatch(/503/);
});

test('output that is not an image fails the attempt with a clear error', async () => {
  await start({ JOB_RETRY_LIMIT: '0' });
  replicate.setScenario({ delivery: 'garbage' });
  const { status } = await run({ prompt: 'garbage' });
  expect(status).toMatchObject({ status: 'failed', attempts: 1 });
  expect(status.error).toMatch(/not an image/);
});

test('several outputs are downloaded, normalised and listed', async () => {
  await start();
  const { id, status } = await run({ prompt: 'three', parameters: { num_outputs: 3, width: 256, height: 256, output_format: 'webp' } });
  expect(status.status).toBe('completed');
  expect(status.outputs.map((o) => [o.url, o.width, o.height, o.format])).toEqual([
    [expect.stringMatching(mediaPath(id, 1, 'webp')), 256, 256, 'webp'],
    [expect.stringMatching(mediaPath(id, 1, 'webp', 1)), 256, 256, 'webp'],
    [expect.stringMatching(mediaPath(id, 1, 'webp', 2)), 256, 256, 'webp'],
  ]);
});

test('a job that runs past its timeout is stopped and its prediction cancelled on Replicate', async () => {
  await start({ JOB_TIMEOUT_SECONDS: '2', JOB_RETRY_LIMIT: '0' });
  replicate.setScenario({ neverFinish: true });
  const { status } = await run({ prompt: 'forever' });
  expect(status.status).toBe('failed');
  expect(status.error).toMatch(/stopped|timed out/);
  const cancel = await replicate.waitForRequest((r) => r.route === 'cancel');
  expect(cancel.path).toBe(`/v1/predictions/${String(status.prediction_id)}/cancel`);
});

test('cancelling a running job cancels its prediction on Replicate', async () => {
  await start();
  replicate.setScenario({ neverFinish: true });
  const res = await submit(svc!.baseUrl, { prompt: 'cancel me' });
  const id = ((await res.json()) as { job_id: string }).job_id;
  // running: the prediction was created and its id recorded
  await waitFor(async () => {
    const body = (await (await fetch(`${svc!.baseUrl}/status/${id}`)).json()) as { prediction_id?: string };
    return body.prediction_id;
  }, 'the prediction id in /status');
  const canceled = await fetch(`${svc!.baseUrl}/jobs/${id}/cancel`, { method: 'POST' });
  expect(canceled.status).toBe(200);
  const cancel = await replicate.waitForRequest((r) => r.route === 'cancel');
  const [prediction] = [...replicate.predictions.values()];
  expect(cancel.path).toBe(`/v1/predictions/${prediction.id}/cancel`);
  await waitFor(async () => (prediction.status === 'canceled' ? true : undefined), 'the prediction to be canceled');
  const attempts = await waitFor(async () => {
    const rows = await listAttempts(svc!.db, id);
    return rows[0]?.outcome === 'canceled' ? rows : undefined;
  }, 'the attempt to end canceled');
  expect(attempts[0].prediction_id).toBe(prediction.id);
});
