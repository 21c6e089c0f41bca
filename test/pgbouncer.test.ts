// PgBouncer (Debian's, test/support/pgbouncer.ts) in transaction mode in front of the test Postgres:
// what works through it (the service's pool and pg-boss: submit, fetch, complete, cancel, events,
// pg-boss's supervision and cron, per-key limits, the shared provider limit) with LISTEN and migrations
// on a direct connection (DATABASE_DIRECT_URL), and what does not work through it, shown one by one:
// LISTEN, session-level advisory locks (node-pg-migrate's migration lock), SET, named prepared statements.
import pg from 'pg';
import { createDatabase, createPool } from '../src/db/database.ts';
import { migrate } from '../src/db/migrate.ts';
import { CHANNEL, createJobEventHub, type JobNotification } from '../src/jobs/job.events.ts';
import { createLogger } from '../src/logger.ts';
import { createLocalProvider } from '../src/providers/local.provider.ts';
import type { ImageProvider } from '../src/providers/provider.ts';
import { createSharedRateLimit, RateLimitBookedError } from '../src/providers/rate-limit.ts';
import { startPgbouncer, type PgBouncer } from './support/pgbouncer.ts';
import { withClient } from './support/postgres.ts';
import { openSse } from './support/sse.ts';
import { adminUrl, bearer, createApiKey, createTestDatabase, startTestService, submit, waitFor, waitForStatus, type TestService } from './support/harness.ts';

let bouncer: PgBouncer;
let directUrl: string;
let pooledUrl: string;
const cleanups: (() => Promise<unknown>)[] = [];

beforeEach(async () => {
  directUrl = await createTestDatabase();
  bouncer = await startPgbouncer(adminUrl(), { poolMode: 'transaction', poolSize: 20 });
  pooledUrl = bouncer.url(new URL(directUrl).pathname.slice(1));
});
afterEach(async () => {
  for (const cleanup of cleanups.splice(0).reverse()) await cleanup();
  await bouncer.stop();
});

/** Lines of PgBouncer's log saying a server sent a notification while no client was linked to it (dropped). */
const droppedNotifications = () =>
  bouncer
    .log()
    .split('\n')
    .filter((l) => l.includes("got packet 'A' from server when not linked")).length;

/** The local generator, except that prompts starting with "hold" run until their signal aborts. */
function holdingProvider() {
  const local = createLocalProvider({ latencyMs: 0 });
  const started: string[] = [];
  const aborted: string[] = [];
  const provider: ImageProvider = {
    name: 'local',
    async generate(request, signal, hooks) {
      if (!request.prompt.startsWith('hold')) return local.generate(request, signal, hooks);
      started.push(request.jobId);
      return new Promise((_, reject) => {
        signal.addEventListener(
          'abort',
          () => {
            aborted.push(request.jobId);
            reject(signal.reason as Error);
          },
          { once: true },
        );
      });
    },
  };
  return { provider, started, aborted };
}

async function startService(env: Record<string, string>, provider: ImageProvider): Promise<TestService> {
  const svc = await startTestService({ databaseUrl: pooledUrl, provider, env });
  cleanups.push(() => svc.stop());
  return svc;
}

async function jobId(res: Response): Promise<string> {
  expect(res.status).toBe(202);
  return ((await res.json()) as { job_id: string }).job_id;
}

test('the supported setup: pool and pg-boss through PgBouncer (transaction mode), LISTEN and migrations direct — submit, run, complete, cancel, events, supervision, limits', async () => {
  const since = new Date();
  const holding = holdingProvider();
  const svc = await startService({ DATABASE_DIRECT_URL: directUrl, RUN_MIGRATIONS: 'true' }, holding.provider);
  const queueErrors: unknown[] = [];
  svc.boss.on('error', (err) => queueErrors.push(err));

  // A job from submit to completed, followed live over SSE.
  const done = await jobId(await submit(svc.baseUrl, { prompt: 'a lighthouse', parameters: { width: 64, height: 64 } }));
  const stream = await openSse(`${svc.baseUrl}/jobs/${done}/events`);
  await stream.ended;
  expect(stream.events.filter((e) => e.event === 'status').map((e) => (e.data as { status: string }).status)).toContain('completed');
  expect(await waitForStatus(svc.baseUrl, done, ['completed', 'failed'])).toMatchObject({ status: 'completed' });

  // A running job canceled: the worker hears of it (job_events) and aborts the generation.
  const held = await jobId(await submit(svc.baseUrl, { prompt: 'hold until canceled', parameters: { width: 64, height: 64 } }));
  await waitFor(async () => (holding.started.includes(held) ? true : undefined), 'the held job to start');
  const heldStream = await openSse(`${svc.baseUrl}/jobs/${held}/events`);
  const cancel = await fetch(`${svc.baseUrl}/jobs/${held}/cancel`, { method: 'POST' });
  expect(cancel.status).toBe(200);
  await waitFor(async () => (holding.aborted.includes(held) ? true : undefined), 'the worker to abort the canceled generation');
  await heldStream.ended;
  expect(heldStream.events.map((e) => (e.data as { status: string }).status).at(-1)).toBe('canceled');

  // With a key: the per-key rate limit (rate-limiter-flexible's store) and the queued-jobs cap (a
  // transaction-scoped advisory lock and setting) run through PgBouncer too.
  const key = await createApiKey(directUrl);
  const keyed = await jobId(await submit(svc.baseUrl, { prompt: 'with a key', parameters: { width: 64, height: 64 } }, bearer(key)));
  expect(await waitForStatus(svc.baseUrl, keyed, ['completed', 'failed'], 30_000, bearer(key))).toMatchObject({ status: 'completed' });

  // pg-boss's supervision, monitoring and cron ran through PgBouncer.
  await waitFor(
    async () =>
      withClient(directUrl, async (c) => {
        const { rows } = await c.query<{ ok: boolean }>(
          `select q.maintain_on > $1 and q.monitor_on > $1 and v.cron_on > $1 as ok from pgboss.queue q, pgboss.version v where q.name = 'generate'`,
          [since],
        );
        return rows[0]?.ok ? true : undefined;
      }),
    "pg-boss's supervision, monitor and cron to run",
    30_000,
  );
  expect(queueErrors).toEqual([]);
  // Nothing was sent to a listener through PgBouncer (none listens there).
  expect(droppedNotifications()).toBe(0);
}, 90_000);

test('the shared provider limit counts right through PgBouncer', async () => {
  const dbs = [1, 2, 3].map(() => createDatabase(createPool({ connectionString: pooledUrl, max: 2, applicationName: 'test:limit' })));
  cleanups.push(() => Promise.all(dbs.map((db) => db.destroy())));
  const limits = dbs.map((db) => createSharedRateLimit(db, { name: 'test', perMinute: 0.001, burst: 4 }));
  const outcomes = await Promise.all(
    Array.from({ length: 24 }, (_, i) =>
      limits[i % 3].take(new AbortController().signal, 0).then(
        () => 'taken',
        (err: unknown) => (err instanceof RateLimitBookedError ? 'refused' : String(err)),
      ),
    ),
  );
  expect(outcomes.filter((o) => o === 'taken')).toHaveLength(4);
  expect(outcomes.filter((o) => o === 'refused')).toHaveLength(20);
});

test('LISTEN through PgBouncer in transaction mode hears nothing: PgBouncer drops each notification (so DATABASE_DIRECT_URL)', async () => {
  const logger = createLogger('silent');
  const [throughBouncer, direct] = await Promise.all([createJobEventHub(pooledUrl, logger), createJobEventHub(directUrl, logger)]);
  cleanups.push(() => Promise.all([throughBouncer.close(), direct.close()]));
  const heard = { throughBouncer: [] as JobNotification[], direct: [] as JobNotification[] };
  throughBouncer.onAny((n) => heard.throughBouncer.push(n));
  direct.onAny((n) => heard.direct.push(n));

  const sent = 5;
  for (let seq = 1; seq <= sent; seq++) {
    const payload = JSON.stringify({ job_id: '00000000-0000-4000-8000-000000000001', seq, status: 'queued' });
    await withClient(directUrl, (c) => c.query('select pg_notify($1, $2)', [CHANNEL, payload]));
  }
  await waitFor(async () => (heard.direct.length === sent ? true : undefined), 'the direct listener to hear every notification');
  // The server connection that ran the LISTEN went back to PgBouncer's pool; each notification arrives
  // on it while no client is linked, and PgBouncer discards it (and says so).
  await waitFor(async () => (droppedNotifications() === sent ? true : undefined), 'PgBouncer to drop each notification');
  expect(heard.throughBouncer).toEqual([]);
});

describe('session state does not survive from one transaction to the next', () => {
  // Two server connections; the tests pin one of them so the next statement must run on the other.
  let small: PgBouncer;
  let client: pg.Client;
  beforeEach(async () => {
    small = await startPgbouncer(adminUrl(), { poolMode: 'transaction', poolSize: 2 });
    client = new pg.Client({ connectionString: small.url(new URL(directUrl).pathname.slice(1)) });
    await client.connect();
    cleanups.push(async () => {
      await client.end();
      await small.stop();
    });
  });

  /**
   * Occupies the server connection with backend `pid` (until the returned function is called), so that
   * the client's next statement runs on the other one.
   */
  async function pinServer(pid: number): Promise<{ holder: pg.Client; release: () => Promise<void> }> {
    const holders = await Promise.all(
      [1, 2].map(async () => {
        const c = new pg.Client({ connectionString: small.url(new URL(directUrl).pathname.slice(1)) });
        await c.connect();
        await c.query('BEGIN');
        return { c, pid: (await c.query<{ pid: number }>('select pg_backend_pid() as pid')).rows[0].pid };
      }),
    );
    const keep = holders.find((h) => h.pid === pid);
    const other = holders.find((h) => h.pid !== pid);
    if (!keep || !other) throw new Error(`backend ${pid} is not one of PgBouncer's two server connections`);
    await other.c.query('COMMIT');
    await other.c.end();
    cleanups.push(() => keep.c.end().catch(() => {}));
    return {
      holder: keep.c,
      release: async () => {
        await keep.c.query('COMMIT');
      },
    };
  }

  const backendOf = async (text: string): Promise<number> => {
    const results = (await client.query(text)) as unknown as pg.QueryResult[] | pg.QueryResult;
    const last = Array.isArray(results) ? results.at(-1)! : results;
    return (last.rows[0] as { pid: number }).pid;
  };

  test('a session-level advisory lock (node-pg-migrate takes one around migrations) is released on another connection: it stays held, and migrations through PgBouncer then fail', async () => {
    const pid = await backendOf('select pg_advisory_lock(7), pg_backend_pid() as pid');
    const { holder, release } = await pinServer(pid);
    const { rows } = await client.query<{ released: boolean }>('select pg_advisory_unlock(7) as released');
    expect(rows[0].released).toBe(false); // not held by this server session
    const held = await holder.query<{ n: number }>("select count(*)::int as n from pg_locks where locktype = 'advisory' and objid = 7 and pid = $1", [pid]);
    expect(held.rows[0].n).toBe(1); // still held by the pooled server connection the client left

    // node-pg-migrate's own lock, through PgBouncer, while a pooled connection holds it from a run
    // whose unlock went elsewhere: "Another migration is already running".
    await holder.query('select pg_advisory_lock(7241865325823964)');
    await expect(migrate(small.url(new URL(directUrl).pathname.slice(1)))).rejects.toThrow('Another migration is already running');
    await holder.query('select pg_advisory_unlock(7241865325823964)');
    await release();
  });

  test('SET applies to whichever session ran it: the client loses it, and the next client of that connection inherits it', async () => {
    const pid = await backendOf("SET statement_timeout = '1234ms'; select pg_backend_pid() as pid");
    const { holder, release } = await pinServer(pid);
    expect((await client.query<{ statement_timeout: string }>('show statement_timeout')).rows[0].statement_timeout).toBe('0');
    expect((await holder.query<{ statement_timeout: string }>('show statement_timeout')).rows[0].statement_timeout).toBe('1234ms');
    await release();
  });

  test('a named prepared statement exists only on the connection that prepared it (PgBouncer 1.18 does not track them)', async () => {
    const pid = (await client.query<{ pid: number }>({ name: 'which', text: 'select pg_backend_pid() as pid' })).rows[0].pid;
    const { release } = await pinServer(pid);
    await expect(client.query({ name: 'which', text: 'select pg_backend_pid() as pid' })).rejects.toThrow('prepared statement "which" does not exist');
    await release();
  });
});
