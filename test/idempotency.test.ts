// Idempotent submission: a repeated Idempotency-Key returns the same job, also under concurrent
// repeats; the same key with a different body is refused.
import { withClient } from './support/postgres.ts';
import { startTestService, submit, type TestService } from './support/harness.ts';

let svc: TestService;
beforeAll(async () => {
  svc = await startTestService({ worker: false });
});
afterAll(async () => {
  await svc?.stop();
});

const body = { prompt: 'idempotent', parameters: { width: 128, height: 128 } };

test('a repeat with the same key returns the same job (200) and creates nothing', async () => {
  const first = await submit(svc.baseUrl, body, { 'idempotency-key': 'key-repeat' });
  expect(first.status).toBe(202);
  const { job_id } = (await first.json()) as { job_id: string };
  const again = await submit(svc.baseUrl, body, { 'idempotency-key': 'key-repeat' });
  expect(again.status).toBe(200);
  expect(await again.json()).toEqual({ job_id, status: 'queued' });
  expect(again.headers.get('location')).toBe(`/status/${job_id}`);
  const n = await withClient(svc.databaseUrl, async (c) => (await c.query("select count(*)::int as n from jobs where prompt = 'idempotent'")).rows[0].n);
  expect(n).toBe(1);
});

test('parameters as a string or as the same object are the same request', async () => {
  const a = await submit(svc.baseUrl, { prompt: 'forms', parameters: '{"height":256,"width":128}' }, { 'idempotency-key': 'key-forms' });
  const b = await submit(svc.baseUrl, { prompt: 'forms', parameters: { width: 128, height: 256 } }, { 'idempotency-key': 'key-forms' });
  expect([a.status, b.status]).toEqual([202, 200]);
  expect(((await a.json()) as { job_id: string }).job_id).toBe(((await b.json()) as { job_id: string }).job_id);
});

test('concurrent repeats all get the one job', async () => {
  const responses = await Promise.all(Array.from({ length: 20 }, () => submit(svc.baseUrl, body, { 'idempotency-key': 'key-concurrent' })));
  const statuses = responses.map((r) => r.status).sort();
  expect(statuses.filter((s) => s === 202)).toHaveLength(1);
  expect(statuses.filter((s) => s === 200)).toHaveLength(19);
  const ids = new Set(await Promise.all(responses.map(async (r) => ((await r.json()) as { job_id: string }).job_id)));
  expect(ids.size).toBe(1);
  const rows = await withClient(
    svc.databaseUrl,
    async (c) =>
      (
        await c.query(
          "select count(*)::int as jobs, (select count(*)::int from pgboss.job q where q.id = any(array_agg(j.id))) as queued from jobs j where idempotency_key = 'key-concurrent'",
        )
      ).rows[0],
  );
  expect(rows).toEqual({ jobs: 1, queued: 1 });
});

test('the same key with a different body is a 422 problem naming the header', async () => {
  await submit(svc.baseUrl, body, { 'idempotency-key': 'key-conflict' });
  const res = await submit(svc.baseUrl, { ...body, prompt: 'something else' }, { 'idempotency-key': 'key-conflict' });
  expect(res.status).toBe(422);
  expect(res.headers.get('content-type')).toMatch(/application\/problem\+json/);
  const problem = (await res.json()) as { errors: { path: string }[] };
  expect(problem.errors[0].path).toBe('/header/idempotency-key');
});

test('a malformed key is a 400', async () => {
  const res = await submit(svc.baseUrl, body, { 'idempotency-key': 'x'.repeat(300) });
  expect(res.status).toBe(400);
});

test('keys are forgotten after IDEMPOTENCY_TTL_HOURS by the maintenance job', async () => {
  const { runMaintenance } = await import('../src/worker/maintenance.handler.ts');
  const { createLogger } = await import('../src/logger.ts');
  const first = await submit(svc.baseUrl, body, { 'idempotency-key': 'key-old' });
  const { job_id } = (await first.json()) as { job_id: string };
  await withClient(svc.databaseUrl, (c) => c.query("update jobs set created_at = now() - interval '25 hours' where id = $1", [job_id]));
  await runMaintenance({ db: svc.db, config: svc.config, logger: createLogger('silent') });
  const again = await submit(svc.baseUrl, body, { 'idempotency-key': 'key-old' });
  expect(again.status).toBe(202);
  expect(((await again.json()) as { job_id: string }).job_id).not.toBe(job_id);
});
