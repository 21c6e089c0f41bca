// The worker's scenarios (issue 9): how many slots are busy when jobs trickle in, when their latencies
// differ, and when thousands wait on a slow provider at once. Each runs `ctx.runs` times on fresh
// databases; the baseline of each figure is the ideal the configuration allows, from the same run.
// Provider latencies come from the local generator (LOCAL_PROVIDER_LATENCY_MS, or per job from the
// prompt: see bench/serve.ts).
import { call, debug, nowMs, percentile, readCpuMs, readMemory, sleep, stopChild } from './common.ts';
import { enqueueOurs, openBenchDb, ourProgress, ourSpanSeconds } from './db.ts';
import { body, drain, image64, startCollector, startServiceChild, type Context, type Measure, type MemoryLog } from './scenarios.ts';

interface WorkerStats {
  inflight: number;
  maxInflight: number;
  meanInflight: number;
  busySlots: number;
  memory: NodeJS.MemoryUsage;
  /** Fetches of the generate queue: how many, the jobs they returned, and how many asked for n jobs. */
  fetches: { count: number; jobs: number; asked: Partial<Record<string, number>> };
  firstStart: number;
  firstEnd: number;
  maxAt: number;
  inflightByLatency: Partial<Record<string, number>>;
}

// ---------------------------------------------------------------------------------------------
// Trickle: long jobs arriving one by one must all run at once, up to the slots.

export async function trickleScenario(ctx: Context): Promise<Measure[]> {
  const slots = 100;
  const jobs = 100;
  const intervalMs = 50;
  const latencyMs = 60_000;
  const peak: number[] = [];
  const reachMs: number[] = [];
  const busyAtEnd: number[] = [];

  for (let run = 0; run < ctx.runs; run++) {
    const db = await ctx.newDatabase(ctx.main, `trickle${run}`);
    try {
      const [worker, api] = await Promise.all([
        startServiceChild(ctx, 'worker', db.url, {
          WORKER_CONCURRENCY: String(slots),
          LOCAL_PROVIDER_LATENCY_MS: String(latencyMs),
          SHUTDOWN_GRACE_SECONDS: '0',
          BENCH_REPORT_STARTS: '1',
        }),
        startServiceChild(ctx, 'api', db.url),
      ]);
      try {
        const starts = startCollector(worker.child);
        const url = `http://127.0.0.1:${api.port}/generate`;
        await (await fetch(`http://127.0.0.1:${api.port}/healthz`)).text(); // a warm connection
        const t0 = nowMs();
        let lastSent = t0;
        const posts: Promise<number>[] = [];
        const ids: Promise<string>[] = [];
        for (let i = 0; i < jobs; i++) {
          const due = t0 + i * intervalMs;
          if (due > nowMs()) await sleep(due - nowMs());
          lastSent = nowMs();
          const res = fetch(url, {
            method: 'POST',
            headers: { 'content-type': 'application/json' },
            body: JSON.stringify({ ...body, prompt: `trickle ${i}` }),
          });
          posts.push(res.then((r) => r.status));
          ids.push(res.then(async (r) => ((await r.json()) as { job_id: string }).job_id));
        }
        const statuses = await Promise.all(posts);
        const refused = statuses.filter((s) => s !== 202).length;
        if (refused > 0) throw new Error(`trickle: ${refused} submissions were not accepted`);
        // All of them in flight, or 10 s after the last submission (then the peak tells how far it got).
        const all = await Promise.all((await Promise.all(ids)).map((id) => starts.wait(id, Math.max(0, lastSent + 10_000 - nowMs()))));
        const stats = await call<WorkerStats>(worker.child, 'stats');
        const started = all.filter((t) => !Number.isNaN(t)).sort((a, b) => a - b);
        peak.push(stats.maxInflight);
        busyAtEnd.push(stats.busySlots);
        reachMs.push(started.length >= jobs ? started[jobs - 1] - lastSent : NaN);
        ctx.log(
          `  run ${run + 1}: peak in flight ${stats.maxInflight} of ${slots}; ${started.length} started; ` +
            `last submission → ${jobs} in flight ${started.length >= jobs ? `${(started[jobs - 1] - lastSent).toFixed(1)} ms` : 'never (10 s)'}`,
        );
      } finally {
        await Promise.all([stopChild(api.child), stopChild(worker.child)]);
      }
    } finally {
      await db.drop();
    }
  }
  return [
    {
      scenario: 'trickle',
      metric: `peak in flight, ${jobs} jobs of ${latencyMs / 1000} s submitted one every ${intervalMs} ms`,
      unit: 'jobs',
      ours: peak,
      baseline: peak.map(() => slots),
      baselineLabel: `WORKER_CONCURRENCY=${slots}`,
      better: 'higher',
      target: { text: `= ${slots}`, check: (o) => o >= slots },
      note: 'submitted through POST /generate to an API process; in flight = inside provider.generate() in the worker process.',
    },
    {
      scenario: 'trickle',
      metric: `last submission sent → ${jobs} in flight`,
      unit: 'ms',
      ours: reachMs,
      better: 'lower',
    },
  ];
}

// ---------------------------------------------------------------------------------------------
// Mixed latencies: a few slow jobs must not keep the other slots idle.

export async function mixedScenario(ctx: Context): Promise<Measure[]> {
  const slots = 100;
  const total = ctx.quick ? 400 : 1_000;
  const slowCount = Math.round(total * 0.05);
  const fastCount = total - slowCount;
  const slowMs = 60_000;
  const fastMs = 500;
  const sampleMs = Number(process.env.BENCH_SAMPLE_MS ?? 100);
  const minShare: number[] = [];
  const p5Share: number[] = [];
  const heldShare: number[] = [];
  const fastRate: number[] = [];
  const fastIdeal: number[] = [];
  const perFetch: number[] = [];
  const singles: number[] = [];

  for (let run = 0; run < ctx.runs; run++) {
    const db = await ctx.newDatabase(ctx.main, `mixed${run}`);
    const bench = await openBenchDb(db.url);
    try {
      // 5% slow, at random places in the queue.
      const slow = new Set<number>();
      while (slow.size < slowCount) slow.add(Math.floor(Math.random() * total));
      await enqueueOurs(bench, total, image64, 500, (n) => (slow.has(n) ? `bench slow latency=${slowMs}ms ${n}` : `bench fast latency=${fastMs}ms ${n}`));
      const worker = await startServiceChild(ctx, 'worker', db.url, {
        WORKER_CONCURRENCY: String(slots),
        LOCAL_PROVIDER_LATENCY_MS: String(fastMs),
        BENCH_LATENCY_BY_PROMPT: '1',
        SHUTDOWN_GRACE_SECONDS: '0',
      });
      try {
        const samples: { busy: number; waiting: number; slowInflight: number; fastDone: number }[] = [];
        const deadline = Date.now() + (ctx.quick ? 60_000 : 120_000);
        for (;;) {
          const tick = Date.now();
          const [{ rows }, stats] = await Promise.all([
            bench.pool.query<{ waiting: number; fast_done: number }>(
              `SELECT (SELECT count(*) FROM pgboss.job WHERE name = 'generate' AND state IN ('created', 'retry'))::int AS waiting,
                      (SELECT count(*) FROM jobs WHERE status = 'completed' AND prompt LIKE 'bench fast%')::int AS fast_done`,
            ),
            call<WorkerStats>(worker.child, 'stats'),
          ]);
          samples.push({ busy: stats.busySlots, waiting: rows[0].waiting, slowInflight: stats.inflightByLatency[slowMs] ?? 0, fastDone: rows[0].fast_done });
          if (rows[0].fast_done >= fastCount) break;
          if (Date.now() > deadline) throw new Error(`mixed latencies: only ${rows[0].fast_done} of ${fastCount} fast jobs done in time`);
          await sleep(Math.max(0, tick + sampleMs - Date.now()));
        }
        const { fetches } = await call<WorkerStats>(worker.child, 'stats');
        perFetch.push(fetches.jobs / fetches.count);
        singles.push((fetches.asked['1'] ?? 0) / fetches.count);
        debug(`mixed fetches: ${JSON.stringify(fetches)}`);
        debug(`mixed samples (busy/waiting/slow/fastDone): ${samples.map((x) => `${x.busy}/${x.waiting}/${x.slowInflight}/${x.fastDone}`).join(' ')}`);
        // Busy slots against what could be busy: min(slots, jobs running + jobs waiting to be fetched),
        // from the first moment every slot that could be busy was (the start-up ramp is the pickup
        // scenario's business) to the last moment a job was still waiting.
        const share = samples.map((x) => x.busy / Math.min(slots, x.busy + x.waiting));
        const from = share.findIndex((v) => v >= 0.95);
        const to = samples.findLastIndex((x) => x.waiting > 0);
        const window = from >= 0 && to >= from ? share.slice(from, to + 1) : share;
        minShare.push(Math.min(...window));
        p5Share.push(percentile(window, 5));
        heldShare.push(window.filter((v) => v >= 0.95).length / window.length);
        // Fast jobs' rate over their span (first fetch → last fast job completed, database clock), against
        // the slots the slow jobs left free (averaged over the samples of that span) / 0.5 s.
        const { rows: span } = await bench.pool.query<{ s: number }>(
          `SELECT extract(epoch FROM (SELECT max(finished_at) FROM jobs WHERE status = 'completed' AND prompt LIKE 'bench fast%')
                                  - (SELECT min(started_on) FROM pgboss.job WHERE name = 'generate'))::float8 AS s`,
        );
        const free = samples.map((x) => slots - x.slowInflight);
        const ideal = free.reduce((a, b) => a + b, 0) / free.length / (fastMs / 1000);
        const rate = fastCount / span[0].s;
        fastRate.push(rate);
        fastIdeal.push(ideal);
        ctx.log(
          `  run ${run + 1}: busy/possible min ${(Math.min(...window) * 100).toFixed(0)}%, p5 ${(percentile(window, 5) * 100).toFixed(0)}%, ` +
            `≥ 95% in ${window.filter((v) => v >= 0.95).length} of ${window.length} samples; fast jobs ${rate.toFixed(0)}/s of an ideal ${ideal.toFixed(0)}/s`,
        );
      } finally {
        await stopChild(worker.child);
      }
    } finally {
      await bench.close();
      await db.drop();
    }
  }
  const what = `${slots} slots, ${total} jobs (${slowCount} of ${slowMs / 1000} s, ${fastCount} of ${fastMs / 1000} s)`;
  return [
    {
      scenario: 'mixed latencies',
      metric: `busy slots / min(slots, running + waiting), lowest sample; ${what}`,
      unit: '%',
      ours: minShare.map((v) => v * 100),
      better: 'higher',
      target: { text: '≥ 95% throughout', check: (o) => o >= 95 },
      note: `sampled every ${sampleMs} ms while jobs wait: busy = the worker's busy slots (fetched, not yet settled; Service.worker.busySlots()), waiting = pg-boss jobs not yet fetched.`,
    },
    { scenario: 'mixed latencies', metric: 'busy slots / possible, 5th percentile of samples', unit: '%', ours: p5Share.map((v) => v * 100), better: 'higher' },
    { scenario: 'mixed latencies', metric: 'samples at ≥ 95%', unit: '%', ours: heldShare.map((v) => v * 100), better: 'higher' },
    { scenario: 'mixed latencies', metric: 'jobs per fetch (mean)', unit: 'jobs', ours: perFetch, better: 'higher' },
    {
      scenario: 'mixed latencies',
      metric: 'fetches that asked for 1 job',
      unit: '%',
      ours: singles.map((v) => v * 100),
      better: 'lower',
      note: 'a fetch asks for min(free slots, WORKER_BATCH_SIZE) jobs; counted in the worker process by wrapping pg-boss fetch.',
    },
    {
      scenario: 'mixed latencies',
      metric: `fast-job throughput`,
      unit: 'jobs/s',
      ours: fastRate,
      baseline: fastIdeal,
      baselineLabel: `slots not held by slow jobs / ${fastMs / 1000} s`,
      better: 'higher',
      note: 'fast jobs completed over first fetch → last fast job completed (DB clock); the ideal averages the free slots over the same samples. 64×64 PNG outputs.',
    },
  ];
}

// ---------------------------------------------------------------------------------------------
// In flight: thousands of jobs waiting on a slow provider in one worker process.

export interface InflightSpec {
  /** WORKER_CONCURRENCY. */
  slots: number;
  jobs: number;
  latencyMs: number;
}

export async function inflightScenario(ctx: Context, memory: MemoryLog, spec: InflightSpec): Promise<Measure[]> {
  const { slots, jobs: count, latencyMs } = spec;
  const rate: number[] = [];
  const ideal: number[] = [];
  const reached: number[] = [];
  const mean: number[] = [];
  const hwm: number[] = [];
  const cpu: number[] = [];
  const ramp: number[] = [];
  const heapMid: number[] = [];
  const drainMs: number[] = [];
  const capped: string[] = [];
  const label = `${slots} × ${latencyMs / 1000} s`;

  for (let run = 0; run < ctx.runs; run++) {
    const db = await ctx.newDatabase(ctx.main, `inflight${run}`);
    const bench = await openBenchDb(db.url);
    try {
      await enqueueOurs(bench, count, image64);
      const worker = await startServiceChild(ctx, 'worker', db.url, {
        WORKER_CONCURRENCY: String(slots),
        LOCAL_PROVIDER_LATENCY_MS: String(latencyMs),
      });
      const cpu0 = readCpuMs(worker.pid);
      const done0 = (await ourProgress(bench)).completed;
      // Where the memory is while every slot waits on the provider (half way through the first round).
      const midway = sleep(latencyMs / 2).then(() => call<WorkerStats>(worker.child, 'stats'));
      midway.catch(() => {});
      try {
        const capSeconds = Math.ceil(count / slots) * (latencyMs / 1000) * 2 + 30;
        if (!(await drain(() => ourProgress(bench), `${count} jobs at ${latencyMs} ms`, capSeconds * 1000))) {
          capped.push(`run ${run + 1} stopped at the ${capSeconds} s cap`);
        }
        const peak = readMemory(worker.pid)?.hwmMb ?? NaN;
        const stats = await call<WorkerStats>(worker.child, 'stats');
        const mid = (await midway).memory;
        const mb = (n: number) => (n / 2 ** 20).toFixed(0);
        ctx.log(
          `  run ${run + 1}: midway, ${(await midway).inflight} in flight: rss ${mb(mid.rss)} MB, V8 heap used ${mb(mid.heapUsed)} of ${mb(mid.heapTotal)} MB, ` +
            `external ${mb(mid.external)} MB (array buffers ${mb(mid.arrayBuffers)} MB)`,
        );
        heapMid.push(mid.heapUsed / 2 ** 20);
        const { completed, failed } = await ourProgress(bench);
        if (failed > 0) ctx.log(`  in flight: ${failed} jobs failed`);
        const r = completed / (await ourSpanSeconds(bench));
        rate.push(r);
        ideal.push(Math.min(slots, count) / (latencyMs / 1000));
        reached.push(stats.maxInflight);
        mean.push(stats.meanInflight);
        hwm.push(peak);
        cpu.push((readCpuMs(worker.pid) - cpu0) / Math.max(1, completed - done0));
        // Where the time beyond the latency goes: the ramp to the peak, and the image work and
        // settlement after the first provider call returned (epoch ms, same host clock).
        const { rows } = await bench.pool.query<{ last: number }>(
          `SELECT extract(epoch FROM max(finished_at)) * 1000 AS last FROM jobs WHERE status = 'completed'`,
        );
        ramp.push(stats.maxAt - stats.firstStart);
        drainMs.push(Number(rows[0].last) - stats.firstEnd);
        memory.add('worker', `in-flight peak (${label})`, peak, 'worker holding the in-flight load (VmHWM)');
        ctx.log(
          `  run ${run + 1}: ${r.toFixed(0)} jobs/s, max in flight ${stats.maxInflight} (reached ${(stats.maxAt - stats.firstStart).toFixed(0)} ms after the first start), ` +
            `mean ${stats.meanInflight.toFixed(0)}, first provider return → last completed ${(Number(rows[0].last) - stats.firstEnd).toFixed(0)} ms, VmHWM ${peak.toFixed(0)} MB`,
        );
      } finally {
        await stopChild(worker.child);
      }
    } finally {
      await bench.close();
      await db.drop();
    }
  }
  return [
    {
      scenario: 'in flight',
      metric: `in flight reached (WORKER_CONCURRENCY=${slots})`,
      unit: 'jobs',
      ours: reached,
      baseline: reached.map(() => slots),
      baselineLabel: 'configured limit',
      better: 'higher',
      target: { text: `= ${slots}`, check: (o) => o >= Math.min(slots, count) },
    },
    {
      scenario: 'in flight',
      metric: `throughput, ${count.toLocaleString('en')} jobs of ${latencyMs / 1000} s`,
      unit: 'jobs/s',
      ours: rate,
      baseline: ideal,
      baselineLabel: 'min(slots, jobs) / latency',
      better: 'higher',
      target: { text: '≥ 90% of baseline', check: (_o, r) => (r ?? 0) >= 0.9 },
      note: `one worker process; timed from the first fetch to the last row completed; 64×64 PNG outputs${capped.length ? `; ${capped.join('; ')} (rated over the jobs done)` : ''}.`,
    },
    { scenario: 'in flight', metric: 'time-weighted mean in flight (first start → last end)', unit: 'jobs', ours: mean, better: 'higher' },
    { scenario: 'in flight', metric: 'first generate() → peak in flight (ramp)', unit: 'ms', ours: ramp, better: 'lower' },
    {
      scenario: 'in flight',
      metric: 'first generate() returned → last job completed',
      unit: 'ms',
      ours: drainMs,
      better: 'lower',
      note: 'the image work and settlement of all jobs after their provider calls return; ideally no longer than the ramp (completions keep pace with starts).',
    },
    { scenario: 'in flight', metric: 'worker CPU per job', unit: 'ms', ours: cpu, better: 'lower' },
    { scenario: 'in flight', metric: 'worker V8 heap used, every slot waiting on the provider', unit: 'MB', ours: heapMid, better: 'lower' },
    {
      scenario: 'in flight',
      metric: `worker peak RSS (VmHWM), ${label}`,
      unit: 'MB',
      ours: hwm,
      better: 'lower',
      target: { text: '< 300 MB', check: (o) => o < 300 },
    },
  ];
}
