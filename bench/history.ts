// Flat cost as history grows (issue 12): the same requests against a database holding 1,000,000
// finished jobs (quick: 100,000) with their events, attempts and a week of pg-boss entries, and against
// an empty one, in the same run. Both services run at once and requests alternate between them one by
// one, so the machine's noise falls on both alike. Figures: submit (POST → 202), pickup (created_at →
// started_at, database clock), /status of a completed job and of a queued one (its queue position),
// GET /jobs first page, and /metrics; ratio = history / empty (target ≤ 1.2×).
import pg from 'pg';
import { LOCAL_PRINCIPAL_ID } from '../src/auth/principal.ts';
import { nowMs, percentile, sleep, stopChild } from './common.ts';
import { body, startCollector, startServiceChild, type Context, type Measure } from './scenarios.ts';

interface Side {
  label: 'empty' | 'history';
  url: string;
  api: Awaited<ReturnType<typeof startServiceChild>>;
  worker: Awaited<ReturnType<typeof startServiceChild>>;
  starts: ReturnType<typeof startCollector>;
  base: string;
  submitted: string[];
}

/**
 * Fills `url` with `count` finished jobs spread over the last 30 days (93% completed with an output, 5%
 * failed, 2% canceled), four events and one attempt each, and pg-boss entries for those of the last
 * 7 days (QUEUE_RETENTION_DAYS), in bulk (generate_series). Triggers are off while it runs (session_
 * replication_role, so it needs a superuser); the job counters are written to match.
 */
export async function fillHistory(url: string, count: number, log: (m: string) => void): Promise<void> {
  const client = new pg.Client({ connectionString: url, application_name: 'bench:history' });
  await client.connect();
  try {
    const { rows } = await client.query<{ rolsuper: boolean }>('select rolsuper from pg_roles where rolname = current_user');
    if (!rows[0]?.rolsuper) throw new Error('the history scenario fills its database with triggers off (session_replication_role), which needs a superuser');
    const step = async (what: string, text: string, values: unknown[] = []) => {
      const t0 = Date.now();
      const res = await client.query(text, values);
      log(`  history: ${what}: ${res.rowCount ?? ''} rows in ${((Date.now() - t0) / 1000).toFixed(1)} s`);
    };
    await client.query('set session_replication_role = replica');
    await step(
      'jobs',
      `insert into jobs (id, owner_id, status, prompt, parameters, provider, attempts, error, outputs, created_at, updated_at, started_at, finished_at, event_seq)
       select id, $2, st, 'a lighthouse on a cliff at dawn, history ' || g, '{"width":64,"height":64,"output_format":"png","num_outputs":1}', 'local', 1,
              case when st = 'failed' then 'the provider refused' end,
              case when st = 'completed' then jsonb_build_array(jsonb_build_object(
                'url', '/media/' || id || '-1-' || md5(id::text) || '.png', 'width', 64, 'height', 64, 'format', 'png', 'bytes', 1234,
                'thumbnail_url', '/media/' || id || '-1-' || md5(id::text) || '.thumb.webp')) else '[]' end,
              t, t + interval '3 s', t + interval '10 ms', t + interval '3 s', 4
         from (select g, gen_random_uuid() as id,
                      case when g % 20 = 0 then 'failed' when g % 50 = 1 then 'canceled' else 'completed' end as st,
                      date_trunc('milliseconds', now() - interval '30 days' + g * (interval '29 days' / $1::int)) as t
                 from generate_series(1, $1::int) g) s`,
      [count, LOCAL_PRINCIPAL_ID],
    );
    await step(
      'events',
      `insert into job_events (job_id, seq, status, progress, created_at)
       select id, e.seq, case e.seq when 1 then 'queued' when 4 then status else 'processing' end, case e.seq when 3 then 0.5 end, created_at + e.seq * interval '1 s'
         from jobs, generate_series(1, 4) as e(seq)`,
    );
    await step(
      'attempts',
      `insert into job_attempts (job_id, number, started_at, finished_at, outcome, worker)
       select id, 1, started_at, finished_at, case status when 'completed' then 'succeeded' when 'failed' then 'failed' else 'canceled' end, 'history' from jobs`,
    );
    await step(
      'pg-boss entries of the last 7 days',
      `insert into pgboss.job (id, name, data, state, created_on, start_after, started_on, completed_on, keep_until, output)
       select id, 'generate', jsonb_build_object('jobId', id), 'completed', created_at, created_at, started_at, finished_at, created_at + interval '14 days', '{"outcome":"completed"}'
         from jobs where finished_at > now() - interval '7 days'`,
    );
    await step(
      'job counters',
      `insert into job_status_counts as c (backend_pid, status, n) select 0, status, count(*) from jobs group by status
       on conflict (backend_pid, status) do update set n = c.n + excluded.n`,
    );
    await client.query('set session_replication_role = default');
  } finally {
    await client.end();
  }
  // What autovacuum would have done by the time such a history exists.
  await vacuumAnalyze(url);
}

async function vacuumAnalyze(url: string): Promise<void> {
  const client = new pg.Client({ connectionString: url, application_name: 'bench:history' });
  await client.connect();
  try {
    await client.query('vacuum analyze jobs, job_events, job_attempts, job_status_counts, pgboss.job');
  } finally {
    await client.end();
  }
}

async function timed(fn: () => Promise<Response>, expectStatus: number): Promise<number> {
  const t0 = nowMs();
  const res = await fn();
  await res.arrayBuffer();
  const ms = nowMs() - t0;
  if (res.status !== expectStatus) throw new Error(`expected ${expectStatus}, got ${res.status}`);
  return ms;
}

export async function historyScenario(ctx: Context): Promise<Measure[]> {
  const finished = ctx.quick ? 100_000 : 1_000_000;
  const jobs = ctx.quick ? 60 : 200; // submitted one at a time to each side
  const reads = ctx.quick ? 200 : 600; // of each read request, per side
  const queuedAhead = 100;
  const names = [
    'submit p50',
    'pickup p50',
    '/status completed p50',
    '/status queued p50',
    'GET /jobs first page p50',
    '/metrics p50',
    'submit p99',
    'pickup p99',
    'jobs by status, count(*) (before the counters) p50',
  ] as const;
  type Name = (typeof names)[number];
  const figures = { empty: new Map<Name, number[]>(), history: new Map<Name, number[]>() };
  const add = (side: 'empty' | 'history', name: Name, value: number) => void (figures[side].get(name) ?? figures[side].set(name, []).get(name)!).push(value);

  const empty = await ctx.newDatabase(ctx.main, 'hist_empty');
  const full = await ctx.newDatabase(ctx.main, 'hist_full');
  try {
    const t0 = Date.now();
    await fillHistory(full.url, finished, (m) => ctx.log(m));
    ctx.log(`  history: ${finished.toLocaleString('en')} finished jobs in ${((Date.now() - t0) / 1000).toFixed(0)} s`);
    await vacuumAnalyze(empty.url); // as the history got

    for (let run = 0; run < ctx.runs; run++) {
      const sides: Side[] = [];
      try {
        for (const [label, url] of [
          ['empty', empty.url],
          ['history', full.url],
        ] as const) {
          const [api, worker] = await Promise.all([startServiceChild(ctx, 'api', url), startServiceChild(ctx, 'worker', url, { BENCH_REPORT_STARTS: '1' })]);
          sides.push({ label, url, api, worker, starts: startCollector(worker.child), base: `http://127.0.0.1:${api.port}`, submitted: [] });
        }
        const post = (s: Side) => fetch(`${s.base}/generate`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(body) });
        // Alternate sides, and which goes first, request by request.
        const each = async (i: number, fn: (s: Side) => Promise<void>) => {
          for (const s of i % 2 ? [...sides].reverse() : sides) await fn(s);
        };

        // Warm both (connections, plans, caches).
        for (let i = 0; i < 10; i++) await each(i, async (s) => void (await (await post(s)).arrayBuffer()));
        await sleep(300);

        // Submit and pickup: one job at a time, idle in between.
        const submits = { empty: [] as number[], history: [] as number[] };
        for (let i = 0; i < jobs; i++) {
          await each(i, async (s) => {
            let id = '';
            const ms = await timed(async () => {
              const res = await post(s);
              id = ((await res.clone().json()) as { job_id: string }).job_id;
              return res;
            }, 202);
            submits[s.label].push(ms);
            s.submitted.push(id);
            await s.starts.wait(id, 10_000);
          });
          await sleep(10 + Math.random() * 20);
        }
        for (const s of sides) {
          const client = new pg.Client({ connectionString: s.url });
          await client.connect();
          const { rows } = await client
            .query<{ ms: number }>(
              `select extract(epoch from started_at - created_at) * 1000 as ms from jobs where id = any($1::uuid[]) and started_at is not null`,
              [s.submitted],
            )
            .finally(() => client.end());
          const pickups = rows.map((r) => Number(r.ms));
          add(s.label, 'submit p50', percentile(submits[s.label], 50));
          add(s.label, 'submit p99', percentile(submits[s.label], 99));
          add(s.label, 'pickup p50', percentile(pickups, 50));
          add(s.label, 'pickup p99', percentile(pickups, 99));
        }

        const reading = async (name: Name, path: (s: Side) => string, n = reads) => {
          const samples = { empty: [] as number[], history: [] as number[] };
          for (let i = 0; i < n; i++) await each(i, async (s) => void samples[s.label].push(await timed(() => fetch(`${s.base}${path(s)}`), 200)));
          for (const s of sides) add(s.label, name, percentile(samples[s.label], 50));
        };
        await reading('/status completed p50', (s) => `/status/${s.submitted[Math.floor(Math.random() * s.submitted.length)]}`);
        await reading('GET /jobs first page p50', () => '/jobs');
        await reading('/metrics p50', () => '/metrics', Math.ceil(reads / 4));
        // What each scrape cost before the counters: grouping every job by status.
        for (const s of sides) {
          const client = new pg.Client({ connectionString: s.url });
          await client.connect();
          const samples: number[] = [];
          try {
            for (let i = 0; i < 5; i++) {
              const t = nowMs();
              await client.query('select status, count(*) from jobs group by status');
              samples.push(nowMs() - t);
            }
          } finally {
            await client.end();
          }
          add(s.label, 'jobs by status, count(*) (before the counters) p50', percentile(samples, 50));
        }

        // A queued job with a queue ahead of it: workers stopped, then `queuedAhead` + 1 submissions.
        await Promise.all(sides.map((s) => stopChild(s.worker.child)));
        const lastQueued = new Map<string, string>();
        for (const s of sides) {
          for (let i = 0; i <= queuedAhead; i++) lastQueued.set(s.label, ((await (await post(s)).json()) as { job_id: string }).job_id);
        }
        await reading('/status queued p50', (s) => `/status/${lastQueued.get(s.label)}`);

        const summary = names
          .filter((n) => n.endsWith('p50'))
          .map((n) => `${n} ${figures.empty.get(n)!.at(-1)!.toFixed(2)} / ${figures.history.get(n)!.at(-1)!.toFixed(2)}`)
          .join('; ');
        ctx.log(`  run ${run + 1} (ms, empty / history): ${summary}`);
      } finally {
        await Promise.all(sides.flatMap((s) => [stopChild(s.api.child), stopChild(s.worker.child)]));
      }
    }
  } finally {
    await empty.drop();
    await full.drop();
  }

  const targeted = new Set<Name>(['submit p50', 'pickup p50', '/status completed p50', '/status queued p50', 'GET /jobs first page p50']);
  const label = 'empty database';
  return names.map((name) => ({
    scenario: 'history',
    metric: `${name}, ${finished.toLocaleString('en')} finished jobs`,
    unit: 'ms',
    ours: figures.history.get(name) ?? [],
    baseline: figures.empty.get(name) ?? [],
    baselineLabel: label,
    better: 'lower' as const,
    ratioAsTimes: true,
    ...(targeted.has(name) ? { target: { text: '≤ 1.2× the empty database', check: (_o: number, r: number | undefined) => (r ?? Infinity) <= 1.2 } } : {}),
    ...(name === 'submit p50'
      ? {
          note: `requests alternate one by one between two services (API + worker each), one on a database with ${finished.toLocaleString('en')} finished jobs (4 events, 1 attempt each; pg-boss entries of the last 7 days), one on an empty one; pickup = jobs.created_at → started_at; /status queued has ${queuedAhead} jobs ahead.`,
        }
      : {}),
  }));
}
