// Real worker processes: killed mid-job, several on one queue, and stopped by signals. Nothing is lost
// and nothing is done twice.
import { readdirSync } from 'node:fs';
import { listAttempts } from '../src/jobs/job.repository.ts';
import { createCallLog, providerCalls, startWorkerProcess, type WorkerProcess } from './support/processes.ts';
import { mediaPath } from './support/media-names.ts';
import { withClient } from './support/postgres.ts';
import { freePort } from '../scripts/free-port.ts';
import { adminUrl, createTestDatabase, startTestService, submit, waitFor, waitForStatus, type TestService } from './support/harness.ts';

let api: TestService;
let databaseUrl: string;
const children: WorkerProcess[] = [];

beforeEach(async () => {
  databaseUrl = await createTestDatabase();
  await createCallLog(databaseUrl);
  // Jobs carry the heartbeat of the configuration that submitted them: 10 s, pg-boss's minimum.
  api = await startTestService({ databaseUrl, worker: false, env: { JOB_HEARTBEAT_SECONDS: '10' } });
});
afterEach(async () => {
  for (const w of children.splice(0)) if (w.child.exitCode === null && w.child.signalCode === null) w.child.kill('SIGKILL');
  await api.stop();
});

async function worker(env: Record<string, string>): Promise<WorkerProcess> {
  const w = await startWorkerProcess(databaseUrl, { MEDIA_DIR: api.config.MEDIA_DIR, ...env });
  children.push(w);
  return w;
}

async function submitMany(n: number, prefix: string): Promise<string[]> {
  const ids: string[] = [];
  for (let i = 0; i < n; i++) {
    const res = await submit(api.baseUrl, { prompt: `${prefix} ${i}`, parameters: { width: 64, height: 64 } });
    expect(res.status).toBe(202);
    ids.push(((await res.json()) as { job_id: string }).job_id);
  }
  return ids;
}

test('a worker killed mid-job: another worker finishes its jobs, each completed once with outputs written once', async () => {
  const doomed = await worker({ LOCAL_PROVIDER_LATENCY_MS: '60000', JOB_HEARTBEAT_SECONDS: '10' });
  const ids = await submitMany(3, 'interrupted');
  await doomed.whenStarted(3);
  doomed.child.kill('SIGKILL');
  expect(await doomed.exited).toBe('SIGKILL');

  const rescuer = await worker({ LOCAL_PROVIDER_LATENCY_MS: '0', JOB_HEARTBEAT_SECONDS: '10' });
  const served: string[] = [];
  for (const id of ids) {
    const status = await waitForStatus(api.baseUrl, id, ['completed', 'failed'], 45_000);
    expect(status).toMatchObject({ status: 'completed', attempts: 2 });
    expect(status.result_url).toMatch(mediaPath(id, 2, 'png'));
    served.push(...status.outputs.flatMap((o) => [o.url, (o as { thumbnail_url?: string }).thumbnail_url ?? ''].map((u) => u.replace('/media/', ''))));
    const attempts = await listAttempts(api.db, id);
    expect(attempts.map((a) => [a.number, a.outcome])).toEqual([
      [1, 'interrupted'],
      [2, 'succeeded'],
    ]);
    expect(attempts[0].worker).toContain(String(doomed.child.pid));
    expect(attempts[1].worker).toContain(String(rescuer.child.pid));
  }
  const calls = await providerCalls(databaseUrl);
  expect(ids.map((id) => calls.get(id))).toEqual([2, 2, 2]); // one killed, one that finished
  const files = readdirSync(api.config.MEDIA_DIR);
  expect(files.filter((f) => !f.startsWith('.')).sort()).toEqual(served.sort()); // just the winners' files
  expect(served).toHaveLength(6);
  expect(files.filter((f) => f.startsWith('.tmp'))).toEqual([]);
}, 90_000);

test('several worker processes on one queue: every job processed, none twice', async () => {
  const ids = await submitMany(150, 'shared');
  const workers = await Promise.all([1, 2, 3].map(() => worker({ LOCAL_PROVIDER_LATENCY_MS: '20', WORKER_CONCURRENCY: '10', WORKER_BATCH_SIZE: '5' })));
  await waitFor(
    async () => {
      const n = await withClient(databaseUrl, async (c) => (await c.query("select count(*)::int as n from jobs where status = 'completed'")).rows[0].n);
      return n === ids.length ? n : undefined;
    },
    'all jobs completed',
    60_000,
  );
  const calls = await providerCalls(databaseUrl);
  expect(ids.filter((id) => calls.get(id) !== 1)).toEqual([]);
  // the work was shared
  const perWorker = workers.map((w) => w.started.length);
  expect(perWorker.reduce((a, b) => a + b, 0)).toBe(ids.length);
  expect(perWorker.filter((n) => n > 0).length).toBeGreaterThan(1);
}, 90_000);

test('SIGTERM: no new jobs are taken, running ones finish within the grace period, exit 0', async () => {
  const w = await worker({ LOCAL_PROVIDER_LATENCY_MS: '1500', WORKER_CONCURRENCY: '2', WORKER_BATCH_SIZE: '1', SHUTDOWN_GRACE_SECONDS: '20' });
  const ids = await submitMany(5, 'graceful');
  await w.whenStarted(2);
  w.child.kill('SIGTERM');
  expect(await w.exited).toBe(0);
  // the two running jobs finished; the other three were never started and are still queued
  const running = w.started.slice(0, 2);
  expect(w.started).toHaveLength(2);
  for (const id of running) expect((await waitForStatus(api.baseUrl, id, ['completed', 'failed'])).status).toBe('completed');
  const rest = ids.filter((id) => !running.includes(id));
  for (const id of rest) expect(((await (await fetch(`${api.baseUrl}/status/${id}`)).json()) as { status: string }).status).toBe('queued');
  // and a new worker finishes them: nothing lost
  await worker({ LOCAL_PROVIDER_LATENCY_MS: '0' });
  for (const id of rest) expect((await waitForStatus(api.baseUrl, id)).status).toBe('completed');
}, 60_000);

test('SIGTERM with jobs outlasting the grace period: they are handed back and finished by another worker', async () => {
  const w = await worker({ LOCAL_PROVIDER_LATENCY_MS: '60000', WORKER_CONCURRENCY: '2', WORKER_BATCH_SIZE: '1', SHUTDOWN_GRACE_SECONDS: '1' });
  const ids = await submitMany(2, 'handed back');
  await w.whenStarted(2);
  w.child.kill('SIGTERM');
  expect(await w.exited).toBe(0);
  await worker({ LOCAL_PROVIDER_LATENCY_MS: '0' });
  for (const id of ids) {
    const status = await waitForStatus(api.baseUrl, id, ['completed', 'failed'], 30_000);
    expect(status).toMatchObject({ status: 'completed', attempts: 2 });
    const [first] = await listAttempts(api.db, id);
    expect(first.outcome === 'failed' || first.outcome === 'interrupted').toBe(true);
  }
}, 60_000);

test('a second signal stops at once', async () => {
  const w = await worker({ LOCAL_PROVIDER_LATENCY_MS: '60000', WORKER_CONCURRENCY: '1', WORKER_BATCH_SIZE: '1', SHUTDOWN_GRACE_SECONDS: '600' });
  await submitMany(1, 'impatient');
  await w.whenStarted(1);
  w.child.kill('SIGTERM');
  w.child.kill('SIGINT');
  expect(await w.exited).toBe(130);
}, 30_000);

test('a worker-only process answers a metrics scrape it cannot complete with 503 and keeps running', async () => {
  const doomedDb = await createTestDatabase();
  await createCallLog(doomedDb);
  const port = await freePort();
  const w = await startWorkerProcess(doomedDb, { METRICS_PORT: String(port) });
  children.push(w);
  expect((await fetch(`http://127.0.0.1:${port}/metrics`)).status).toBe(200);
  // The database goes away under it: the job-count gauges cannot be read.
  await withClient(adminUrl(), (c) => c.query(`DROP DATABASE "${new URL(doomedDb).pathname.slice(1)}" WITH (FORCE)`));
  const res = await fetch(`http://127.0.0.1:${port}/metrics`);
  expect(res.status).toBe(503);
  expect((await fetch(`http://127.0.0.1:${port}/metrics`)).status).toBe(503); // still there to answer
  expect(w.child.exitCode).toBeNull();
  expect(w.child.signalCode).toBeNull();
});
