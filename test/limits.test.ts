// Per-key limits: request rate and queued jobs hold across two real API processes on one database
// (they are counted in Postgres); open event streams are capped per key; a queue position is
// computed once per change for all the streams watching a job.
import type { KyselyPlugin } from 'kysely';
import { createDatabase, createPool } from '../src/db/database.ts';
import { createQueuePositions } from '../src/http/queue-positions.ts';
import { createJobEventHub } from '../src/jobs/job.events.ts';
import { createLogger } from '../src/logger.ts';
import { startApiProcess, type ApiProcess } from './support/processes.ts';
import { openSse } from './support/sse.ts';
import { bearer, createApiKey, createTestDatabase, startTestService, submit, waitFor, type TestService } from './support/harness.ts';

async function expectTooMany(res: Response) {
  expect(res.status).toBe(429);
  expect(res.headers.get('content-type')).toMatch(/^application\/problem\+json/);
  expect(Number(res.headers.get('retry-after'))).toBeGreaterThanOrEqual(1);
  expect(await res.json()).toMatchObject({ status: 429, title: 'Too Many Requests' });
}

describe('two API processes on one database', () => {
  const SUSTAINED = 5; // per second
  const BURST = 20; // extra per minute
  const MAX_QUEUED = 4;
  let databaseUrl: string;
  let apis: ApiProcess[] = [];

  beforeAll(async () => {
    databaseUrl = await createTestDatabase();
    const env = {
      ANONYMOUS_ACCESS: 'off',
      KEY_RATE_LIMIT_PER_SECOND: String(SUSTAINED),
      KEY_RATE_LIMIT_BURST: String(BURST),
      KEY_MAX_QUEUED_JOBS: String(MAX_QUEUED),
    };
    apis = await Promise.all([startApiProcess(databaseUrl, env), startApiProcess(databaseUrl, env)]);
  });
  afterAll(async () => {
    await Promise.all(apis.map((a) => a.stop()));
  });

  test('the request rate of a key is shared: concurrent clients on both processes get its allowance once, then 429', async () => {
    const key = await createApiKey(databaseUrl, { name: 'rate' });
    const other = await createApiKey(databaseUrl, { name: 'bystander' });
    const started = Date.now();
    const answers = await Promise.all(Array.from({ length: 120 }, (_, i) => fetch(`${apis[i % 2].baseUrl}/jobs?limit=1`, { headers: bearer(key) })));
    const seconds = Math.ceil((Date.now() - started) / 1000) + 1; // one-second windows the burst can have touched
    const ok = answers.filter((r) => r.status === 200).length;
    const refused = answers.filter((r) => r.status === 429);
    expect(ok + refused.length).toBe(answers.length);
    // At least one window's sustained allowance plus the burst allowance...
    expect(ok).toBeGreaterThanOrEqual(SUSTAINED + BURST);
    // ...and no more than the allowance of the windows it spanned: counted per process, each process
    // would have let through its own, twice as many (2 × (5 + 20) = 50 in the first second alone).
    expect(ok).toBeLessThanOrEqual(BURST + SUSTAINED * seconds);
    expect(refused.length).toBeGreaterThan(0);
    await expectTooMany(refused[0]);
    for (const r of refused.slice(1)) await r.body?.cancel();
    // another key is not affected
    expect((await fetch(`${apis[0].baseUrl}/jobs?limit=1`, { headers: bearer(other) })).status).toBe(200);
  });

  test('the queued-jobs cap holds under concurrent submissions to both processes; a slot frees when a job leaves the queue', async () => {
    const key = await createApiKey(databaseUrl, { name: 'queue' });
    const answers = await Promise.all(Array.from({ length: 12 }, (_, i) => submit(apis[i % 2].baseUrl, { prompt: `queued ${i}` }, bearer(key))));
    const accepted = answers.filter((r) => r.status === 202);
    const refused = answers.filter((r) => r.status === 429);
    expect(accepted).toHaveLength(MAX_QUEUED); // no worker runs here: they all stay queued
    expect(refused).toHaveLength(12 - MAX_QUEUED);
    await expectTooMany(refused[0]);
    for (const r of refused.slice(1)) await r.body?.cancel();

    // A repeat of an accepted submission (Idempotency-Key) still gets its job while the queue is full.
    const other = await createApiKey(databaseUrl, { name: 'queue-idem' });
    const idem = { ...bearer(other), 'idempotency-key': 'first' };
    expect((await submit(apis[0].baseUrl, { prompt: 'idem 1' }, idem)).status).toBe(202);
    for (let i = 2; i <= MAX_QUEUED; i++) expect((await submit(apis[1].baseUrl, { prompt: `idem ${i}` }, bearer(other))).status).toBe(202);
    await expectTooMany(await submit(apis[0].baseUrl, { prompt: 'one too many' }, bearer(other)));
    expect((await submit(apis[1].baseUrl, { prompt: 'idem 1' }, idem)).status).toBe(200);

    // Canceling one of the first key's jobs frees a place.
    const { job_id } = (await accepted[0].json()) as { job_id: string };
    expect((await fetch(`${apis[0].baseUrl}/jobs/${job_id}/cancel`, { method: 'POST', headers: bearer(key) })).status).toBe(200);
    expect((await submit(apis[1].baseUrl, { prompt: 'after a cancel' }, bearer(key))).status).toBe(202);
    await expectTooMany(await submit(apis[0].baseUrl, { prompt: 'full again' }, bearer(key)));
  });
});

describe('event streams per key', () => {
  let svc: TestService;
  beforeAll(async () => {
    // No worker: the job stays queued and its streams stay open.
    svc = await startTestService({ worker: false, env: { ANONYMOUS_ACCESS: 'off', KEY_MAX_EVENT_STREAMS: '2' } });
  });
  afterAll(async () => {
    await svc?.stop();
  });

  test('beyond KEY_MAX_EVENT_STREAMS a key gets 429; closing one lets a new one open; other keys are not counted', async () => {
    const key = await createApiKey(svc.databaseUrl, { name: 'streams' });
    const other = await createApiKey(svc.databaseUrl, { name: 'other streams' });
    const { job_id } = (await (await submit(svc.baseUrl, { prompt: 'watched' }, bearer(key))).json()) as { job_id: string };
    const url = `${svc.baseUrl}/jobs/${job_id}/events`;
    const first = await openSse(url, bearer(key));
    const second = await openSse(url, bearer(key));
    expect([first.status, second.status]).toEqual([200, 200]);
    await expectTooMany(await fetch(url, { headers: bearer(key) }));
    // the other key's job and streams are its own
    const { job_id: otherJob } = (await (await submit(svc.baseUrl, { prompt: 'other' }, bearer(other))).json()) as { job_id: string };
    const theirs = await openSse(`${svc.baseUrl}/jobs/${otherJob}/events`, bearer(other));
    expect(theirs.status).toBe(200);

    first.close();
    // The server notices the close asynchronously: wait for the slot, not for a fixed time.
    const third = await waitFor(async () => {
      const s = await openSse(url, bearer(key));
      if (s.status === 200) return s;
      s.close();
      return undefined;
    }, 'a stream slot to free up');
    expect(third.status).toBe(200);
    for (const s of [second, third, theirs]) s.close();
  });
});

describe('queue positions', () => {
  test('one computation per change serves every watcher of a job', async () => {
    const databaseUrl = await createTestDatabase();
    const svc = await startTestService({ databaseUrl, worker: false });
    const logger = createLogger('silent');
    const hub = await createJobEventHub(databaseUrl, logger);
    let queries = 0;
    const counting: KyselyPlugin = {
      transformQuery: (args) => {
        queries++;
        return args.node;
      },
      transformResult: async (args) => args.result,
    };
    const db = createDatabase(createPool({ connectionString: databaseUrl, max: 2, applicationName: 'test:positions' })).withPlugin(counting);
    const positions = createQueuePositions(db, hub, logger);
    try {
      // a job behind one other: position 2
      await submit(svc.baseUrl, { prompt: 'ahead', priority: 5 });
      const { job_id } = (await (await submit(svc.baseUrl, { prompt: 'watched' })).json()) as { job_id: string };
      const WATCHERS = 50;
      const seen: number[][] = Array.from({ length: WATCHERS }, () => []);
      const offs = seen.map((list) => positions.watch(job_id, (p) => list.push(p)));
      await waitFor(async () => (seen.every((l) => l.at(-1) === 2) ? true : undefined), 'every watcher to see position 2');
      const before = queries;
      // two jobs jump ahead: the position changes for every watcher
      await submit(svc.baseUrl, { prompt: 'urgent 1', priority: 9 });
      await submit(svc.baseUrl, { prompt: 'urgent 2', priority: 9 });
      await waitFor(async () => (seen.every((l) => l.at(-1) === 4) ? true : undefined), 'every watcher to see position 4');
      const spent = queries - before;
      // each refresh reads the job and counts the queue ahead (2 queries); a refresh per watcher
      // would be 50 times that
      expect(spent).toBeGreaterThan(0);
      expect(spent).toBeLessThanOrEqual(2 * 4);
      for (const off of offs) off();
    } finally {
      positions.close();
      await hub.close();
      await db.destroy();
      await svc.stop();
    }
  });
});
