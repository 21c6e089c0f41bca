// A database outage: Postgres is stopped while the API and the worker run (jobs in flight, jobs
// queued), then started again. While it is down the API answers 503 problem+json with Retry-After
// (never a crash, never a hang) and /healthz stays up; once it is back everything recovers on its own,
// and every job accepted before the outage completes.
//
// This file runs its own embedded Postgres (the shared test server must not go down under other files).
import { chmodSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { inspect } from 'node:util';
import { freePort } from '../scripts/free-port.ts';
import { startEmbeddedPostgres, type EmbeddedPostgres } from '../src/db/embedded-postgres.ts';
import { createLocalProvider } from '../src/providers/local.provider.ts';
import type { ImageProvider } from '../src/providers/provider.ts';
import { startTestService, submit, waitFor, type StatusBody, type TestService } from './support/harness.ts';

/** Each request must answer within this, outage or not: a hang fails the test instead of stalling it. */
const REQUEST_BOUND_MS = 8_000;
const LATENCY_MS = 2_500;

let dir: string;
let pg: EmbeddedPostgres;
let svc: TestService;

/** The local generator with latency, telling the test when each generation starts and ends. */
function observedProvider(): ImageProvider & { started: Set<string>; finished: Map<string, number> } {
  const local = createLocalProvider({ latencyMs: LATENCY_MS });
  const started = new Set<string>();
  const finished = new Map<string, number>();
  return {
    name: 'local',
    started,
    finished,
    async generate(request, signal, hooks) {
      started.add(request.jobId);
      try {
        return await local.generate(request, signal, hooks);
      } finally {
        finished.set(request.jobId, Date.now());
      }
    },
  };
}
const provider = observedProvider();

// The `process` a jest test sees is a sandbox copy whose own listeners never fire (and jest hands the
// same copy to `import 'node:process'`). A function made by the main realm's Function constructor (that
// of any Node core function) sees the main realm's global `process`: the real one, on which Node reports
// unhandled rejections and uncaught exceptions.
const realProcess = (inspect.constructor as FunctionConstructor)('return process')() as NodeJS.Process;
const unhandled: unknown[] = [];
const onUnhandled = (reason: unknown) => void unhandled.push(reason);

beforeAll(async () => {
  expect(realProcess).not.toBe(process);
  expect(realProcess.pid).toBe(process.pid);
  realProcess.on('unhandledRejection', onUnhandled);
  realProcess.on('uncaughtException', onUnhandled);
  // jest-circus listens on this same object (and fails the running test as well if one arrives)
  expect(realProcess.listenerCount('unhandledRejection')).toBeGreaterThanOrEqual(2);
  dir = mkdtempSync(path.join(tmpdir(), 'media-outage-pg-'));
  chmodSync(dir, 0o755); // as root, Postgres runs as another user that must reach the data dir
  pg = await startEmbeddedPostgres({
    dataDir: path.join(dir, 'data'),
    port: await freePort(),
    flags: ['-c', 'fsync=off', '-c', 'synchronous_commit=off', '-c', 'full_page_writes=off'],
  });
  svc = await startTestService({
    databaseUrl: pg.url,
    provider,
    env: {
      RUN_MIGRATIONS: 'true',
      // pg-boss's minimum: a job whose handler finished during the outage (its result lost) is retried
      // once its heartbeat is 10 s overdue.
      JOB_HEARTBEAT_SECONDS: '10',
      // two at a time, so that some jobs run through the outage while others wait in the queue
      WORKER_CONCURRENCY: '2',
      WORKER_BATCH_SIZE: '2',
    },
  });
}, 120_000);

afterAll(async () => {
  realProcess.off('unhandledRejection', onUnhandled);
  realProcess.off('uncaughtException', onUnhandled);
  await svc?.stop();
  await pg?.stop().catch(() => {});
  if (dir) rmSync(dir, { recursive: true, force: true });
});

interface Answer {
  status: number;
  contentType: string;
  retryAfter: string | null;
  body: unknown;
  ms: number;
}

/** One bounded request: a hang becomes a failure naming the request, not a stuck test. */
async function request(pathname: string, init: RequestInit = {}): Promise<Answer> {
  const started = Date.now();
  let res: Response;
  try {
    res = await fetch(`${svc.baseUrl}${pathname}`, { ...init, signal: AbortSignal.timeout(REQUEST_BOUND_MS) });
  } catch (err) {
    throw new Error(`${init.method ?? 'GET'} ${pathname} got no answer within ${REQUEST_BOUND_MS} ms (${Date.now() - started} ms): ${String(err)}`, {
      cause: err,
    });
  }
  const text = await res.text();
  let body: unknown = text;
  try {
    body = JSON.parse(text);
  } catch {
    // not JSON; the assertions below say so
  }
  return { status: res.status, contentType: res.headers.get('content-type') ?? '', retryAfter: res.headers.get('retry-after'), body, ms: Date.now() - started };
}

function expectUnavailable(answer: Answer, what: string) {
  const summary = `${what}: ${answer.status} ${answer.contentType} ${JSON.stringify(answer.body)}`;
  if (answer.status !== 503) throw new Error(`expected 503 during the outage, got ${summary}`);
  expect(answer.contentType).toMatch(/^application\/problem\+json/);
  expect(answer.body).toMatchObject({ type: expect.any(String), title: expect.any(String), status: 503 });
  expect(answer.retryAfter).toMatch(/^[1-9]\d*$/);
}

const post = (body: unknown): RequestInit => ({ method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(body) });

async function statusOf(id: string): Promise<StatusBody> {
  const answer = await request(`/status/${id}`);
  if (answer.status !== 200) throw new Error(`GET /status/${id}: ${answer.status} ${JSON.stringify(answer.body)}`);
  return answer.body as StatusBody;
}

test('Postgres stopped and started again: 503s while down, recovery on its own, every accepted job completes', async () => {
  // --- before: jobs accepted, two of them running with latency, the rest queued ------------------
  const accepted: string[] = [];
  for (let i = 0; i < 6; i++) {
    const res = await submit(svc.baseUrl, { prompt: `before the outage ${i}`, parameters: { width: 64, height: 64 } });
    expect(res.status).toBe(202);
    accepted.push(((await res.json()) as { job_id: string }).job_id);
  }
  await waitFor(async () => (provider.started.size >= 2 ? true : undefined), 'two jobs to be running', 20_000);
  const runningAtStop = [...provider.started].filter((id) => !provider.finished.has(id));
  expect(runningAtStop.length).toBeGreaterThanOrEqual(1);
  const queuedAtStop = accepted.filter((id) => !provider.started.has(id));
  expect(queuedAtStop.length).toBeGreaterThanOrEqual(2);

  // --- the outage --------------------------------------------------------------------------------
  const stoppedAt = Date.now();
  await pg.stop();

  // The first requests meet pooled connections the server just closed; later ones meet a refused
  // connect. Both must be a clean 503. Check several rounds, the last after the running jobs'
  // generations ended during the outage (so the worker's bookkeeping failed while it was down).
  const rounds: Answer[][] = [];
  const round = async () => {
    const answers = [
      await request('/generate', post({ prompt: 'during the outage' })),
      await request(`/status/${accepted[0]}`),
      await request(`/status/${queuedAtStop[0]}`),
      await request('/readyz'),
      await request('/healthz'),
    ];
    const [gen, st1, st2, ready, health] = answers;
    expectUnavailable(gen, 'POST /generate');
    expectUnavailable(st1, 'GET /status (running job)');
    expectUnavailable(st2, 'GET /status (queued job)');
    expectUnavailable(ready, 'GET /readyz');
    expect(health.status).toBe(200);
    expect(health.body).toEqual({ status: 'ok' });
    rounds.push(answers);
  };
  await round();
  await round();
  await waitFor(
    async () => (runningAtStop.every((id) => (provider.finished.get(id) ?? 0) > stoppedAt) ? true : undefined),
    'the running generations to end during the outage',
    20_000,
  );
  await round();
  await round();
  // no answer during the outage came anywhere near the bound (the pool's connect timeout is 5 s)
  expect(Math.max(...rounds.flat().map((a) => a.ms))).toBeLessThan(REQUEST_BOUND_MS);

  // --- recovery: no restart of the service -------------------------------------------------------
  await pg.start();
  const readyAgainMs = await waitFor(
    async () => {
      const answer = await request('/readyz');
      return answer.status === 200 ? Date.now() : undefined;
    },
    '/readyz to answer 200 again',
    30_000,
    100,
  );
  expect(readyAgainMs).toBeGreaterThan(0);
  const after = await request('/generate', post({ prompt: 'after the outage', parameters: { width: 64, height: 64 } }));
  expect(after.status).toBe(202);
  const afterId = (after.body as { job_id: string }).job_id;

  // Every job accepted before the outage completes: the queued ones normally, the ones whose
  // bookkeeping failed mid-outage once their heartbeat is overdue (10 s) and they are retried.
  const finalStatuses = await waitFor(
    async () => {
      const statuses = await Promise.all([...accepted, afterId].map(statusOf));
      return statuses.every((s) => s.status === 'completed' || s.status === 'failed' || s.status === 'canceled') ? statuses : undefined;
    },
    'every job to finish after the outage',
    60_000,
    250,
  );
  expect(finalStatuses.map((s) => [s.job_id, s.status])).toEqual([...accepted, afterId].map((id) => [id, 'completed']));
  for (const s of finalStatuses) {
    expect(s.outputs).toHaveLength(1);
    const image = await fetch(`${svc.baseUrl}${s.result_url}`, { signal: AbortSignal.timeout(REQUEST_BOUND_MS) });
    expect(image.status).toBe(200);
  }
  // the service is whole again: readiness, and a status read straight after
  expect((await request('/readyz')).status).toBe(200);
  expect((await statusOf(afterId)).status).toBe('completed');
  // nothing went unhandled in the process (pool, pg-boss, worker, HTTP) through outage and recovery
  expect(unhandled.map(String)).toEqual([]);
}, 180_000);
