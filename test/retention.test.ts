// Retention deletes exactly the finished jobs past JOB_RETENTION_DAYS (with their attempts, events,
// webhook deliveries and files), oldest first, in batches, and nothing else (queued, processing,
// recent, a job whose Idempotency-Key is still remembered); the worker runs it as a pg-boss job. The
// job counters behind /metrics agree with count(*) after concurrent transitions, rollbacks, deletes and
// folding the rows of closed connections.
import { randomUUID } from 'node:crypto';
import { existsSync, mkdtempSync, readdirSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import pg from 'pg';
import { PgBoss } from 'pg-boss';
import { LOCAL_PRINCIPAL_ID } from '../src/auth/principal.ts';
import { createDatabase, createPool } from '../src/db/database.ts';
import { countJobsByStatus, foldJobCounts } from '../src/jobs/job.repository.ts';
import { createLogger } from '../src/logger.ts';
import { createLocalStorage } from '../src/media/storage.ts';
import { runRetention } from '../src/worker/retention.handler.ts';
import { withClient } from './support/postgres.ts';
import { createTestDatabase, startTestService, submit, waitFor, waitForStatus, type StatusBody, type TestService } from './support/harness.ts';

const logger = createLogger('silent');
const body = { prompt: 'kept or not', parameters: { width: 64, height: 64 } };

async function query<T extends pg.QueryResultRow = Record<string, unknown>>(url: string, text: string, values: unknown[] = []): Promise<T[]> {
  return withClient(url, async (c) => (await c.query<T>(text, values)).rows);
}

/** Inserts a job row straight into the table (statuses the worker would take time to produce). */
async function insertJob(url: string, status: string, ages: { createdDaysAgo: number; finishedDaysAgo?: number }): Promise<string> {
  const id = randomUUID();
  await query(
    url,
    `insert into jobs (id, owner_id, status, prompt, parameters, provider, created_at, started_at, finished_at)
     values ($1, $2, $3, 'inserted', '{}', 'local', now() - make_interval(days => $4), now() - make_interval(days => $4),
             case when $5::int is null then null else now() - make_interval(days => $5::int) end)`,
    [id, LOCAL_PRINCIPAL_ID, status, ages.createdDaysAgo, ages.finishedDaysAgo ?? null],
  );
  return id;
}

async function completedJob(svc: TestService, headers: Record<string, string> = {}): Promise<StatusBody> {
  const res = await submit(svc.baseUrl, body, headers);
  const { job_id } = (await res.json()) as { job_id: string };
  return waitForStatus(svc.baseUrl, job_id, ['completed']);
}

const fileNames = (job: StatusBody) =>
  job.outputs
    .flatMap((o) => [o.url, (o as { thumbnail_url?: string }).thumbnail_url ?? ''])
    .filter(Boolean)
    .map((u) => path.basename(u));

async function age(url: string, id: string, finishedDaysAgo: number): Promise<void> {
  await query(url, `update jobs set finished_at = now() - make_interval(days => $2) where id = $1`, [id, finishedDaysAgo]);
}

async function remaining(url: string, ids: string[]) {
  const [row] = await query<{ jobs: string[]; events: number; attempts: number; deliveries: number }>(
    url,
    `select coalesce((select array_agg(id::text order by id) from jobs where id = any($1::uuid[])), '{}') as jobs,
            (select count(*)::int from job_events where job_id = any($1::uuid[])) as events,
            (select count(*)::int from job_attempts where job_id = any($1::uuid[])) as attempts,
            (select count(*)::int from webhook_deliveries where job_id = any($1::uuid[])) as deliveries`,
    [ids],
  );
  return row;
}

async function addDelivery(url: string, jobId: string): Promise<void> {
  await query(
    url,
    `insert into webhook_deliveries (id, job_id, event, url, payload, status) values ($1, $2, 'completed', 'https://example.com/hook', '{}', 'delivered')`,
    [randomUUID(), jobId],
  );
}

describe('retention of finished jobs', () => {
  let svc: TestService;
  beforeAll(async () => {
    // JOB_RETENTION_DAYS unset here: the scheduled run only folds counters, so the runs below are the only deletions.
    svc = await startTestService();
  });
  afterAll(async () => {
    await svc?.stop();
  });

  test('deletes the old finished jobs with their attempts, events, deliveries and files, oldest first, in batches; nothing else', async () => {
    const url = svc.databaseUrl;
    const storage = await createLocalStorage(svc.config.MEDIA_DIR);
    const [a, b, c, recent, remembered] = await Promise.all([
      completedJob(svc),
      completedJob(svc),
      completedJob(svc),
      completedJob(svc),
      completedJob(svc, { 'idempotency-key': 'still-remembered' }),
    ]);
    await age(url, a.job_id, 45);
    await age(url, b.job_id, 44);
    await age(url, c.job_id, 43);
    await age(url, remembered.job_id, 50);
    // Its key is remembered (IDEMPOTENCY_TTL_HOURS after it was created), so it stays however long ago it finished.
    const failed = await insertJob(url, 'failed', { createdDaysAgo: 43, finishedDaysAgo: 42 });
    const canceled = await insertJob(url, 'canceled', { createdDaysAgo: 42, finishedDaysAgo: 41 });
    const youngFailed = await insertJob(url, 'failed', { createdDaysAgo: 40, finishedDaysAgo: 29 });
    const queued = await insertJob(url, 'queued', { createdDaysAgo: 60 });
    const processing = await insertJob(url, 'processing', { createdDaysAgo: 60 });
    await addDelivery(url, a.job_id);
    await addDelivery(url, recent.job_id);

    const old = [a.job_id, b.job_id, c.job_id, failed, canceled];
    const kept = [recent.job_id, remembered.job_id, youngFailed, queued, processing];
    const oldFiles = [a, b, c].flatMap(fileNames);
    const keptFiles = [recent, remembered].flatMap(fileNames);
    expect(oldFiles).toHaveLength(6); // an image and its thumbnail each
    expect(readdirSync(svc.config.MEDIA_DIR)).toEqual(expect.arrayContaining([...oldFiles, ...keptFiles]));
    const before = await remaining(url, old);
    expect(before).toMatchObject({ jobs: [...old].sort(), deliveries: 1 });
    expect(before.events).toBeGreaterThanOrEqual(old.length);
    expect(before.attempts).toBe(3);
    const keptBefore = await remaining(url, kept);

    const deps = { db: svc.db, storage, logger, config: { JOB_RETENTION_DAYS: 30 } };
    // A run stopped after its first batch (shutdown) has deleted the two oldest, and only them.
    const stopped = new AbortController();
    stopped.abort();
    expect(await runRetention(deps, { batchSize: 2, signal: stopped.signal })).toEqual({ jobs: 2, files: 4, batches: 1 });
    expect((await remaining(url, old)).jobs).toEqual([c.job_id, failed, canceled].sort());
    for (const name of fileNames(a)) expect(existsSync(path.join(svc.config.MEDIA_DIR, name))).toBe(false);
    for (const name of fileNames(c)) expect(existsSync(path.join(svc.config.MEDIA_DIR, name))).toBe(true);

    // The next run goes on where it stopped: three more in two batches.
    expect(await runRetention(deps, { batchSize: 2 })).toEqual({ jobs: 3, files: 2, batches: 2 });
    expect(await remaining(url, old)).toEqual({ jobs: [], events: 0, attempts: 0, deliveries: 0 });
    expect(await remaining(url, kept)).toEqual(keptBefore);
    expect(keptBefore).toMatchObject({ jobs: [...kept].sort(), attempts: 2, deliveries: 1 });
    const files = readdirSync(svc.config.MEDIA_DIR);
    expect(files.filter((f) => oldFiles.includes(f))).toEqual([]);
    expect(files).toEqual(expect.arrayContaining(keptFiles));

    // What clients see: a deleted job is unknown, a kept one is whole.
    expect((await fetch(`${svc.baseUrl}/status/${a.job_id}`)).status).toBe(404);
    expect((await fetch(`${svc.baseUrl}${recent.result_url}`)).status).toBe(200);
    expect((await fetch(`${svc.baseUrl}${a.result_url}`)).status).toBe(404);
    // Nothing is left to delete.
    expect(await runRetention(deps, { batchSize: 2 })).toEqual({ jobs: 0, files: 0, batches: 0 });
  });

  test('with JOB_RETENTION_DAYS unset nothing is deleted', async () => {
    const url = svc.databaseUrl;
    const ancient = await insertJob(url, 'completed', { createdDaysAgo: 4000, finishedDaysAgo: 3999 });
    const storage = await createLocalStorage(svc.config.MEDIA_DIR);
    expect(await runRetention({ db: svc.db, storage, logger, config: { JOB_RETENTION_DAYS: undefined } })).toEqual({ jobs: 0, files: 0, batches: 0 });
    expect((await remaining(url, [ancient])).jobs).toEqual([ancient]);
  });
});

test('the worker runs retention when its scheduled job comes (JOB_RETENTION_DAYS=30), and /metrics agrees with count(*)', async () => {
  const url = await createTestDatabase();
  const mediaDir = mkdtempSync(path.join(tmpdir(), 'media-retention-'));
  // One job finished 31 days ago with its two files, one finished yesterday.
  const stored = (id: string) => [`${id}-1-${'e'.repeat(32)}.png`, `${id}-1-${'e'.repeat(32)}.thumb.webp`];
  const old = await insertJob(url, 'completed', { createdDaysAgo: 32, finishedDaysAgo: 31 });
  const young = await insertJob(url, 'completed', { createdDaysAgo: 2, finishedDaysAgo: 1 });
  for (const id of [old, young]) {
    const [image, thumbnail] = stored(id);
    await query(url, 'update jobs set outputs = $2 where id = $1', [
      id,
      JSON.stringify([{ url: `/media/${image}`, thumbnail_url: `/media/${thumbnail}`, width: 64, height: 64, format: 'png', bytes: 1 }]),
    ]);
    for (const name of [image, thumbnail]) writeFileSync(path.join(mediaDir, name), 'x');
  }
  // What the cron sends every 10 minutes, waiting before the worker starts (which fetches at once).
  const boss = new PgBoss({ connectionString: url, max: 1, supervise: false, schedule: false, migrate: false });
  await boss.start();
  expect(await boss.send('retention', {})).toEqual(expect.any(String));
  await boss.stop({ graceful: false });

  const svc = await startTestService({ databaseUrl: url, env: { JOB_RETENTION_DAYS: '30', MEDIA_DIR: mediaDir } });
  try {
    await waitFor(async () => ((await remaining(url, [old])).jobs.length === 0 ? true : undefined), 'the old job to be deleted');
    expect((await remaining(url, [young])).jobs).toEqual([young]);
    expect(readdirSync(mediaDir).sort()).toEqual(stored(young).sort());

    const text = await (await fetch(`${svc.baseUrl}/metrics`)).text();
    const gauge = Object.fromEntries([...text.matchAll(/^media_jobs\{status="(\w+)"\} (\d+)$/gm)].map((m) => [m[1], Number(m[2])]));
    expect(gauge).toEqual({ queued: 0, processing: 0, completed: 1, failed: 0, canceled: 0 });
    expect(gauge).toEqual(await countStarOracle(url));
  } finally {
    await svc.stop();
  }
});

/** Jobs by status, counted the slow way. */
async function countStarOracle(url: string): Promise<Record<string, number>> {
  const counts: Record<string, number> = { queued: 0, processing: 0, completed: 0, failed: 0, canceled: 0 };
  for (const row of await query<{ status: string; n: number }>(url, 'select status, count(*)::int as n from jobs group by status')) counts[row.status] = row.n;
  return counts;
}

test('job counters agree with count(*) after concurrent transitions, rollbacks and deletes, also once closed connections are folded', async () => {
  const url = await createTestDatabase();
  const db = createDatabase(createPool({ connectionString: url, max: 2, applicationName: 'test:counts' }));
  const statuses = ['queued', 'processing', 'completed', 'failed', 'canceled'];
  // A deterministic mix per connection, each on rows of its own (no lock waits between them).
  const work = async (seed: number) => {
    // mulberry32
    let state = seed;
    const rand = (n: number) => {
      state = (state + 0x6d2b79f5) | 0;
      let t = Math.imul(state ^ (state >>> 15), 1 | state);
      t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
      return Math.floor((((t ^ (t >>> 14)) >>> 0) / 4294967296) * n);
    };
    const client = new pg.Client({ connectionString: url });
    await client.connect();
    const pid = (await client.query<{ pid: number }>('select pg_backend_pid() as pid')).rows[0].pid;
    const mine: string[] = [];
    try {
      for (let step = 0; step < 120; step++) {
        const rollback = rand(5) === 0;
        await client.query('begin');
        const op = mine.length < 3 ? 0 : rand(8) - 2;
        if (op <= 0) {
          const ids = Array.from({ length: 1 + rand(3) }, () => randomUUID());
          await client.query(`insert into jobs (id, owner_id, prompt, parameters, provider) select unnest($1::uuid[]), $2, 'count', '{}', 'local'`, [
            ids,
            LOCAL_PRINCIPAL_ID,
          ]);
          if (!rollback) mine.push(...ids);
        } else if (op === 1) {
          await client.query('update jobs set status = $2 where id = $1', [mine[rand(mine.length)], statuses[rand(5)]]);
        } else if (op === 2) {
          // Several rows in one statement, some already in the target status.
          await client.query(`update jobs set status = $2 where id = any($1::uuid[])`, [mine.filter(() => rand(2) === 0), statuses[rand(5)]]);
        } else if (op === 3) {
          await client.query('update jobs set progress = 0.5 where id = $1', [mine[rand(mine.length)]]); // not a status change
        } else if (op === 4) {
          const gone = mine.filter(() => rand(6) === 0);
          await client.query('delete from jobs where id = any($1::uuid[])', [gone]);
          if (!rollback) for (const id of gone) mine.splice(mine.indexOf(id), 1);
        } else {
          await client.query(`update jobs set status = 'completed', finished_at = now() where id = any($1::uuid[]) and status = 'processing'`, [
            mine.filter(() => rand(3) === 0),
          ]);
        }
        await client.query(rollback ? 'rollback' : 'commit');
      }
    } finally {
      await client.end();
    }
    return pid;
  };
  try {
    const pids = await Promise.all([1, 2, 3, 4].map(work));
    const oracle = await countStarOracle(url);
    // The mix really mixed: every status is present.
    expect(Object.values(oracle).every((n) => n > 0)).toBe(true);
    expect(await countJobsByStatus(db)).toEqual(oracle);

    // The four connections are closed: their rows fold into one, and the counts stay.
    const rowsBefore = (await query<{ n: number }>(url, 'select count(*)::int as n from job_status_counts where backend_pid <> 0'))[0].n;
    expect(rowsBefore).toBeGreaterThan(0);
    await waitFor(
      async () => ((await query(url, 'select 1 from pg_stat_activity where pid = any($1::int[])', [pids])).length === 0 ? true : undefined),
      'the closed connections to go',
    );
    expect(await foldJobCounts(db)).toBeGreaterThan(0);
    expect(await countJobsByStatus(db)).toEqual(oracle);
    const left = await query<{ backend_pid: number }>(url, 'select distinct backend_pid from job_status_counts');
    const live = new Set((await query<{ pid: number }>(url, 'select pid from pg_stat_activity')).map((r) => r.pid));
    expect(left.filter((r) => r.backend_pid !== 0 && !live.has(r.backend_pid))).toEqual([]);
  } finally {
    await db.destroy();
  }
});
