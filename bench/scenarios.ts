// The scenarios of issue 5. Each runs `ctx.runs` times on fresh databases and returns per-run figures
// of ours and of its baseline from the same run; run.ts turns them into medians, spreads and ratios.
import type { ChildProcess } from 'node:child_process';
import { mkdtempSync } from 'node:fs';
import path from 'node:path';
import { debug, forkChild, nowMs, peakRss, percentile, readCpuMs, readMemory, sleep, stopChild, waitForMessage } from './common.ts';
import { bareProgress, bareSpanSeconds, enqueueBare, enqueueOurs, openBenchDb, ourProgress, ourSpanSeconds } from './db.ts';
import type { LoadResult, LoadSpec } from './load.ts';
import type { PipelineSpec } from './pipeline-baseline.ts';
import { parseConfig } from '../src/config.ts';

export interface Server {
  adminUrl: string;
  /** How it was started and with which durability settings (printed in the table header). */
  description: string;
}

export interface Context {
  quick: boolean;
  runs: number;
  tmp: string;
  logLevel: string;
  /** Extra environment for every service process (--service-env), e.g. MALLOC_ARENA_MAX=2. */
  serviceEnv: Record<string, string>;
  main: Server;
  durable: Server;
  newDatabase(server: Server, label: string): Promise<{ url: string; drop(): Promise<void> }>;
  log(message: string): void;
}

/** One figure per run; `baseline` from the same run; ratio computed per run. */
export interface Measure {
  scenario: string;
  metric: string;
  unit: string;
  ours: number[];
  baseline?: number[];
  baselineLabel?: string;
  /** 'higher': ratio ours/baseline, in %; 'lower': ratio baseline/ours, "× better". */
  better: 'higher' | 'lower';
  /** Print the ratio as ours/baseline ("1.4×") whatever `better` says (memory). */
  ratioAsTimes?: boolean;
  target?: { text: string; check: (ours: number, ratio: number | undefined) => boolean };
  note?: string;
}

export const image64 = { width: 64, height: 64, format: 'png' as const };
export const body = { prompt: 'a lighthouse on a cliff at dawn, benchmark', parameters: { width: 64, height: 64 } };

// ---------------------------------------------------------------------------------------------
// Children

interface Started {
  child: ChildProcess;
  pid: number;
  port: number;
}

export async function startServiceChild(ctx: Context, role: 'api' | 'worker', url: string, env: Record<string, string> = {}): Promise<Started> {
  const mediaDir = mkdtempSync(path.join(ctx.tmp, `media-${role}-`));
  const child = forkChild('./serve.ts', {
    logFile: path.join(ctx.tmp, `${role}.log`),
    env: {
      NODE_ENV: 'production',
      HOST: '127.0.0.1',
      PORT: '0',
      LOG_LEVEL: ctx.logLevel,
      MEDIA_DIR: mediaDir,
      RUN_MIGRATIONS: 'false',
      PROVIDER: 'local',
      BENCH_ROLE: role,
      BENCH_DATABASE_URL: url,
      ...ctx.serviceEnv,
      ...env,
    },
  });
  const t0 = Date.now();
  const ready = await waitForMessage<{ port: number; pid: number }>(child, 'ready', 60_000);
  debug(`${role} ready in ${Date.now() - t0} ms`);
  return { child, pid: ready.pid, port: ready.port };
}

async function startBareWorker(ctx: Context, url: string, env: Record<string, string>): Promise<Started> {
  const child = forkChild('./boss-worker.ts', { logFile: path.join(ctx.tmp, 'boss-worker.log'), env: { BENCH_DATABASE_URL: url, ...env } });
  const ready = await waitForMessage<{ pid: number }>(child, 'ready', 60_000);
  return { child, pid: ready.pid, port: 0 };
}

/**
 * Runs a load child to completion. Returns its result, its peak RSS, and the CPU time `watchPid` (the
 * process under test) used per request during the measured phase (after the warm-up).
 */
export async function runLoad(
  ctx: Context,
  spec: LoadSpec,
  watchPid?: number,
): Promise<{ result: LoadResult; peakRssMb: number; watchedCpuMsPerRequest: number }> {
  const child = forkChild('./load.ts', { logFile: path.join(ctx.tmp, 'load.log'), env: { BENCH_LOAD: JSON.stringify(spec) } });
  const result = waitForMessage<LoadResult>(child, 'result', (spec.durationSeconds + (spec.warmupSeconds ?? 0) + 60) * 1000);
  result.catch(() => {});
  let cpuAtStart = NaN;
  let rss: { stop(): number } | undefined;
  try {
    await waitForMessage(child, 'measuring', (spec.warmupSeconds ?? 0) * 1000 + 60_000);
    if (watchPid) cpuAtStart = readCpuMs(watchPid);
    rss = peakRss(child.pid!);
    const r = await result;
    const used = watchPid ? readCpuMs(watchPid) - cpuAtStart : NaN;
    return { result: r, peakRssMb: rss.stop(), watchedCpuMsPerRequest: used / Math.max(1, r.requests) };
  } finally {
    rss?.stop();
    await stopChild(child, 5_000);
  }
}

/** RSS after the process has settled with nothing to do. */
async function idleRss(pid: number, settleMs: number): Promise<number> {
  await sleep(settleMs);
  return readMemory(pid)?.rssMb ?? NaN;
}

// ---------------------------------------------------------------------------------------------
// 1. Submit

export async function submitScenario(ctx: Context, memory: MemoryLog): Promise<Measure[]> {
  const connections = 32;
  const poolMax = 10; // DATABASE_POOL_MAX default, for the API and the baseline alike
  const seconds = ctx.quick ? 2 : 6;
  const warmup = ctx.quick ? 1 : 2;
  const ours = {
    rps: [] as number[],
    p50: [] as number[],
    p99: [] as number[],
    halfRate: [] as number[],
    halfP50: [] as number[],
    halfP99: [] as number[],
    cpu: [] as number[],
  };
  const base = { rps: [] as number[], p50: [] as number[], p99: [] as number[], cpu: [] as number[] };

  for (let run = 0; run < ctx.runs; run++) {
    const db = await ctx.newDatabase(ctx.durable, `submit${run}`);
    try {
      const doOurs = async () => {
        const api = await startServiceChild(ctx, 'api', db.url, { DATABASE_POOL_MAX: String(poolMax) });
        try {
          memory.add('api', 'idle', await idleRss(api.pid, ctx.quick ? 500 : 1000), 'API at idle');
          const target = `http://127.0.0.1:${api.port}`;
          const apiRss = peakRss(api.pid);
          const { result, watchedCpuMsPerRequest } = await runLoad(
            ctx,
            { kind: 'http', target, connections, durationSeconds: seconds, warmupSeconds: warmup, body },
            api.pid,
          );
          memory.add('api', 'submit peak load', apiRss.stop(), 'API under submit load (peak)');
          ours.cpu.push(watchedCpuMsPerRequest);
          if (result.errors > 0) ctx.log(`  submit: ${result.errors} non-202 responses or errors at peak`);
          ours.rps.push(result.perSecond);
          ours.p50.push(result.p50);
          ours.p99.push(result.p99);
          const half = (await runLoad(ctx, { kind: 'http', target, connections, durationSeconds: seconds, rate: result.perSecond / 2, body })).result;
          ours.halfRate.push(half.perSecond);
          ours.halfP50.push(half.p50);
          ours.halfP99.push(half.p99);
          ctx.log(
            `  run ${run + 1}: API ${result.perSecond.toFixed(0)} req/s p50 ${result.p50.toFixed(1)} p99 ${result.p99.toFixed(1)} ms; at ${half.perSecond.toFixed(0)} req/s p99 ${half.p99.toFixed(1)} ms`,
          );
        } finally {
          await stopChild(api.child);
        }
      };
      const doBase = async () => {
        const { result, peakRssMb } = await runLoad(ctx, {
          kind: 'pg',
          target: db.url,
          connections,
          poolMax,
          durationSeconds: seconds,
          warmupSeconds: warmup,
          body,
        });
        memory.addBaseline('api', 'submit peak load', peakRssMb);
        base.cpu.push(result.cpuMsPerRequest ?? NaN);
        base.rps.push(result.perSecond);
        base.p50.push(result.p50);
        base.p99.push(result.p99);
        ctx.log(`  run ${run + 1}: direct pg ${result.perSecond.toFixed(0)} tx/s p50 ${result.p50.toFixed(1)} p99 ${result.p99.toFixed(1)} ms`);
      };
      await alternate(run, doOurs, doBase);
    } finally {
      await db.drop();
    }
  }
  const label = 'same INSERTs via pg, 1 tx each';
  return [
    {
      scenario: 'submit',
      metric: `throughput, ${connections} connections`,
      unit: 'req/s',
      ours: ours.rps,
      baseline: base.rps,
      baselineLabel: label,
      better: 'higher',
      target: { text: '≥ 60% of baseline', check: (_o, r) => (r ?? 0) >= 0.6 },
    },
    { scenario: 'submit', metric: 'latency p50 at peak', unit: 'ms', ours: ours.p50, baseline: base.p50, baselineLabel: label, better: 'lower' },
    { scenario: 'submit', metric: 'latency p99 at peak', unit: 'ms', ours: ours.p99, baseline: base.p99, baselineLabel: label, better: 'lower' },
    {
      scenario: 'submit',
      metric: 'CPU per submission, process talking to Postgres',
      unit: 'ms',
      ours: ours.cpu,
      baseline: base.cpu,
      baselineLabel: 'the direct-pg process',
      better: 'lower',
      ratioAsTimes: true,
      note: 'ours: CPU of the API process per request at peak; baseline: CPU of the direct-pg load process per transaction (Postgres CPU not included).',
    },
    { scenario: 'submit', metric: 'rate held at half peak', unit: 'req/s', ours: ours.halfRate, better: 'higher' },
    { scenario: 'submit', metric: 'latency p50 at half peak', unit: 'ms', ours: ours.halfP50, better: 'lower' },
    {
      scenario: 'submit',
      metric: 'latency p99 at half peak',
      unit: 'ms',
      ours: ours.halfP99,
      better: 'lower',
      target: { text: '< 25 ms', check: (o) => o < 25 },
    },
  ];
}

// ---------------------------------------------------------------------------------------------
// 2. Pickup latency

/** Collects {type, jobId, t} reports of a child ('handler': pg-boss called our handler; 'start': generate()). */
export function startCollector(child: ChildProcess, type = 'start') {
  const starts = new Map<string, number>();
  const waiters = new Map<string, (t: number) => void>();
  child.on('message', (m: { type?: string; jobId?: string; t?: number }) => {
    if (m.type !== type || !m.jobId) return;
    starts.set(m.jobId, m.t!);
    waiters.get(m.jobId)?.(m.t!);
  });
  return {
    /** The handler start time of job `id`, or NaN after `timeoutMs`. */
    wait(id: string, timeoutMs: number): Promise<number> {
      const known = starts.get(id);
      if (known !== undefined) return Promise.resolve(known);
      return new Promise((resolve) => {
        const timer = setTimeout(() => {
          waiters.delete(id);
          resolve(NaN);
        }, timeoutMs);
        waiters.set(id, (t) => {
          clearTimeout(timer);
          waiters.delete(id);
          resolve(t);
        });
      });
    },
  };
}

export async function pickupScenario(ctx: Context, memory: MemoryLog): Promise<Measure[]> {
  const oursJobs = ctx.quick ? 50 : 200;
  const baseQueues = ctx.quick ? 60 : 40;
  const basePerQueue = ctx.quick ? 1 : 5;
  const ours = {
    p50: [] as number[],
    p99: [] as number[],
    max: [] as number[],
    generateP50: [] as number[],
    generateP99: [] as number[],
    startedP50: [] as number[],
    startedP99: [] as number[],
    startedMax: [] as number[],
    runningP50: [] as number[],
    runningP99: [] as number[],
    missed: 0,
    breakdown: {} as Record<string, number[]>,
  };
  const base = { p50: [] as number[], p99: [] as number[], max: [] as number[], missed: 0 };

  for (let run = 0; run < ctx.runs; run++) {
    const db = await ctx.newDatabase(ctx.main, `pickup${run}`);
    const bench = await openBenchDb(db.url);
    try {
      const queues = Array.from({ length: baseQueues }, (_, i) => `bench-poll-${i}`);
      for (const q of queues) await bench.boss.createQueue(q); // pg-boss defaults: no notify

      const doOurs = async () => {
        const [worker, api] = await Promise.all([
          startServiceChild(ctx, 'worker', db.url, { BENCH_REPORT_STARTS: '1' }),
          startServiceChild(ctx, 'api', db.url),
        ]);
        try {
          memory.add('worker', 'idle', await idleRss(worker.pid, ctx.quick ? 500 : 1000), 'worker at idle');
          const handlers = startCollector(worker.child, 'handler');
          const notified = startCollector(worker.child, 'notified');
          const starts = startCollector(worker.child, 'start');
          const base = `http://127.0.0.1:${api.port}/generate`;
          const post = () => fetch(base, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(body) });
          for (let i = 0; i < 5; i++) await (await post()).json(); // warm the connection and both processes
          await sleep(300);
          const rss = peakRss(worker.pid);
          const latencies: number[] = [];
          const toGenerate: number[] = [];
          const submitted: { id: string; t0: number; response: number; notified: number; handler: number; start: number }[] = [];
          for (let i = 0; i < oursJobs; i++) {
            const t0 = nowMs();
            const res = await post();
            const { job_id } = (await res.json()) as { job_id: string };
            const response = nowMs();
            const h = await handlers.wait(job_id, 5_000);
            const t = await starts.wait(job_id, 5_000);
            if (Number.isNaN(h)) ours.missed++;
            else latencies.push(h - t0);
            if (!Number.isNaN(t)) toGenerate.push(t - t0);
            submitted.push({ id: job_id, t0, response, notified: await notified.wait(job_id, 0), handler: h, start: t });
            await sleep(20 + Math.random() * 40); // idle again before the next one
          }
          memory.add('worker', 'pickup load', rss.stop(), 'worker during the pickup scenario');
          // Where the time goes, from the database's timestamps (same host clock): the submit
          // transaction's start (pgboss created_on), the fetch (started_on), the attempt's start.
          const { rows } = await bench.pool.query<{ id: string; created: number; fetched: number; attempt: number | null; row_created: number }>(
            `SELECT j.id::text, extract(epoch FROM q.created_on) * 1000 AS created, extract(epoch FROM q.started_on) * 1000 AS fetched,
                    extract(epoch FROM j.started_at) * 1000 AS attempt, extract(epoch FROM j.created_at) * 1000 AS row_created
               FROM jobs j JOIN pgboss.job q ON q.id = j.id AND q.name = 'generate' WHERE j.id = ANY($1::uuid[])`,
            [submitted.map((s) => s.id)],
          );
          const byId = new Map(rows.map((r) => [r.id, r]));
          // The job's own record: created_at (the submit transaction) → started_at (the attempt's
          // transaction), both on the database's clock; and created → generate() called.
          const createdToStarted = rows.filter((r) => r.attempt !== null).map((r) => Number(r.attempt) - Number(r.row_created));
          const createdToRunning = submitted.filter((x) => byId.has(x.id) && !Number.isNaN(x.start)).map((x) => x.start - Number(byId.get(x.id)!.row_created));
          ours.startedP50.push(percentile(createdToStarted, 50));
          ours.startedP99.push(percentile(createdToStarted, 99));
          ours.startedMax.push(Math.max(...createdToStarted));
          ours.runningP50.push(percentile(createdToRunning, 50));
          ours.runningP99.push(percentile(createdToRunning, 99));
          const parts = {
            response: [] as number[],
            postToTx: [] as number[],
            txToNotified: [] as number[],
            notifiedToFetch: [] as number[],
            commitToFetch: [] as number[],
            fetchToHandler: [] as number[],
            handlerToAttempt: [] as number[],
            attemptToStart: [] as number[],
          };
          for (const s of submitted) {
            const r = byId.get(s.id);
            if (!r || Number.isNaN(s.start) || Number.isNaN(s.handler)) continue;
            parts.response.push(s.response - s.t0);
            parts.postToTx.push(Number(r.created) - s.t0);
            parts.commitToFetch.push(Number(r.fetched) - Number(r.created));
            if (!Number.isNaN(s.notified)) {
              parts.txToNotified.push(s.notified - Number(r.created));
              parts.notifiedToFetch.push(Number(r.fetched) - s.notified);
            }
            parts.fetchToHandler.push(s.handler - Number(r.fetched));
            parts.handlerToAttempt.push(Number(r.attempt) - s.handler);
            parts.attemptToStart.push(s.start - Number(r.attempt));
          }
          for (const [k, v] of Object.entries(parts)) (ours.breakdown[k] ??= []).push(percentile(v, 50));
          ours.p50.push(percentile(latencies, 50));
          ours.p99.push(percentile(latencies, 99));
          ours.max.push(Math.max(...latencies));
          ours.generateP50.push(percentile(toGenerate, 50));
          ours.generateP99.push(percentile(toGenerate, 99));
          ctx.log(
            `  run ${run + 1}: ours created → started p50 ${percentile(createdToStarted, 50).toFixed(1)} p99 ${percentile(createdToStarted, 99).toFixed(1)} ms; ` +
              `POST → handler p50 ${percentile(latencies, 50).toFixed(1)} p99 ${percentile(latencies, 99).toFixed(1)} ms (${latencies.length} jobs)`,
          );
        } finally {
          await Promise.all([stopChild(api.child), stopChild(worker.child)]);
        }
      };
      const doBase = async () => {
        const worker = await startBareWorker(ctx, db.url, { BENCH_MODE: 'poll', BENCH_QUEUES: queues.join(',') });
        try {
          memory.addBaseline('worker', 'idle', await idleRss(worker.pid, ctx.quick ? 500 : 1000));
          const starts = startCollector(worker.child);
          const latencies: number[] = [];
          await Promise.all(
            queues.map(async (q) => {
              for (let i = 0; i < basePerQueue; i++) {
                // A uniformly random moment within the 2 s poll cycle (the worker sleeps 2 s after each fetch).
                await sleep(Math.random() * 2000);
                const t0 = nowMs();
                const id = await bench.boss.send(q, {});
                const t = await starts.wait(id!, 10_000);
                if (Number.isNaN(t)) base.missed++;
                else latencies.push(t - t0);
              }
            }),
          );
          base.p50.push(percentile(latencies, 50));
          base.p99.push(percentile(latencies, 99));
          base.max.push(Math.max(...latencies));
          ctx.log(
            `  run ${run + 1}: polling p50 ${percentile(latencies, 50).toFixed(0)} p99 ${percentile(latencies, 99).toFixed(0)} ms (${latencies.length} jobs)`,
          );
        } finally {
          await stopChild(worker.child);
        }
      };
      await alternate(run, doOurs, doBase);
    } finally {
      await bench.close();
      await db.drop();
    }
  }
  const label = 'pg-boss default polling';
  const missed = ours.missed + base.missed > 0 ? ` (not picked up in time: ours ${ours.missed}, baseline ${base.missed})` : '';
  return [
    {
      scenario: 'pickup',
      metric: `created → started p50 (${oursJobs} jobs, idle)`,
      unit: 'ms',
      ours: ours.startedP50,
      better: 'lower',
      target: { text: '≤ 5 ms', check: (o) => o <= 5 },
      note: 'jobs.created_at (the submit transaction) → jobs.started_at (the attempt transaction, status processing), both on the database clock; one job at a time, the service idle in between.',
    },
    {
      scenario: 'pickup',
      metric: 'created → started p99',
      unit: 'ms',
      ours: ours.startedP99,
      better: 'lower',
      target: { text: '≤ 15 ms', check: (o) => o <= 15 },
    },
    { scenario: 'pickup', metric: 'created → started max', unit: 'ms', ours: ours.startedMax, better: 'lower' },
    { scenario: 'pickup', metric: 'created → generate() called p50', unit: 'ms', ours: ours.runningP50, better: 'lower' },
    { scenario: 'pickup', metric: 'created → generate() called p99', unit: 'ms', ours: ours.runningP99, better: 'lower' },
    {
      scenario: 'pickup',
      metric: `POST sent → handler start p50 (baseline: ${baseQueues * basePerQueue} jobs)`,
      unit: 'ms',
      ours: ours.p50,
      baseline: base.p50,
      baselineLabel: label,
      better: 'lower',
      target: { text: '≥ 50× better', check: (_o, r) => (r ?? 0) >= 50 },
      note: `ours: just before POST /generate (to the API process) → a fetch of the worker returns the job to its slot loop; baseline: just before boss.send() → handler called.${missed}`,
    },
    {
      scenario: 'pickup',
      metric: 'POST sent → handler start p99',
      unit: 'ms',
      ours: ours.p99,
      baseline: base.p99,
      baselineLabel: label,
      better: 'lower',
      target: { text: '≥ 50× better', check: (_o, r) => (r ?? 0) >= 50 },
    },
    { scenario: 'pickup', metric: 'POST sent → handler start max', unit: 'ms', ours: ours.max, baseline: base.max, baselineLabel: label, better: 'lower' },
    { scenario: 'pickup', metric: 'POST sent → generate() called p50', unit: 'ms', ours: ours.generateP50, better: 'lower' },
    { scenario: 'pickup', metric: 'POST sent → generate() called p99', unit: 'ms', ours: ours.generateP99, better: 'lower' },
    ...(
      [
        ['postToTx', 'breakdown p50: POST sent → submit tx begins'],
        ['commitToFetch', 'breakdown p50: submit tx begins → fetch begins'],
        ['txToNotified', '  of which: submit tx begins → worker notified (tx, commit, NOTIFY)'],
        ['notifiedToFetch', '  of which: worker notified → fetch begins'],
        ['fetchToHandler', 'breakdown p50: fetch begins → jobs back in the worker'],
        ['handlerToAttempt', 'breakdown p50: jobs back → attempt tx begins'],
        ['attemptToStart', 'breakdown p50: attempt tx begins → generate()'],
        ['response', 'POST → 202 received p50 (client side)'],
      ] as const
    ).map(([k, metric]) => ({ scenario: 'pickup', metric, unit: 'ms', ours: ours.breakdown[k] ?? [], better: 'lower' as const })),
  ];
}

// ---------------------------------------------------------------------------------------------
// 3. Queue throughput

/**
 * Waits until no job is pending, or until `capMs` has passed (then returns false: the rate is measured
 * over the jobs done so far, which is a steady-state rate while a backlog waits). Fails on a stall.
 */
export async function drain(progress: () => Promise<{ pending: number }>, what: string, capMs: number): Promise<boolean> {
  const deadline = Date.now() + capMs;
  let last = -1;
  let lastChange = Date.now();
  for (;;) {
    const { pending } = await progress();
    if (pending === 0) return true;
    if (Date.now() > deadline) return false;
    if (pending !== last) {
      last = pending;
      lastChange = Date.now();
    } else if (Date.now() - lastChange > 30_000) {
      throw new Error(`${what}: no progress for 30 s with ${pending} jobs left`);
    }
    await sleep(100);
  }
}

export async function throughputScenario(ctx: Context, memory: MemoryLog): Promise<Measure[]> {
  const count = ctx.quick ? 2_000 : 20_000;
  // Bounds the run time whatever the pipeline's speed; a capped run is rated over the jobs it did.
  const capSeconds = ctx.quick ? 5 : 20;
  // The worker's default WORKER_CONCURRENCY: the plain loop runs at the same concurrency.
  const concurrency = parseConfig({}).WORKER_CONCURRENCY;
  const queue = 'bench-noop';
  const ours: number[] = [];
  const noop: number[] = [];
  const plain: number[] = [];
  const enqueueRates: number[] = [];
  const capped: string[] = [];
  const oursCpu: number[] = [];
  const noopCpu: number[] = [];
  const plainCpu: number[] = [];

  for (let run = 0; run < ctx.runs; run++) {
    const db = await ctx.newDatabase(ctx.main, `throughput${run}`);
    const bench = await openBenchDb(db.url);
    try {
      await bench.boss.createQueue(queue, { partition: true, notify: true });
      const doOurs = async () => {
        const t0 = nowMs();
        await enqueueOurs(bench, count, image64);
        enqueueRates.push(count / ((nowMs() - t0) / 1000));
        const worker = await startServiceChild(ctx, 'worker', db.url, { LOCAL_PROVIDER_LATENCY_MS: '0' });
        const cpu0 = readCpuMs(worker.pid);
        const done0 = (await ourProgress(bench)).completed;
        try {
          const drained = await drain(() => ourProgress(bench), `our ${count} jobs`, capSeconds * 1000);
          memory.add('worker', 'throughput peak', readMemory(worker.pid)?.hwmMb ?? NaN, 'worker draining the throughput backlog (VmHWM)');
          const { failed, completed } = await ourProgress(bench);
          if (failed > 0) ctx.log(`  throughput: ${failed} of our jobs failed`);
          if (!drained) capped.push(`run ${run + 1}: ours ${completed.toLocaleString('en')} of ${count.toLocaleString('en')} in the ${capSeconds} s cap`);
          const rate = completed / (await ourSpanSeconds(bench));
          ours.push(rate);
          oursCpu.push((readCpuMs(worker.pid) - cpu0) / Math.max(1, completed - done0));
          ctx.log(`  run ${run + 1}: ours ${rate.toFixed(0)} jobs/s (${completed} completed${drained ? '' : `, stopped at the ${capSeconds} s cap`})`);
        } finally {
          await stopChild(worker.child);
        }
      };
      const doNoop = async () => {
        await enqueueBare(bench, queue, count);
        const worker = await startBareWorker(ctx, db.url, { BENCH_MODE: 'noop', BENCH_QUEUE: queue });
        const cpu0 = readCpuMs(worker.pid);
        const done0 = (await bareProgress(bench, queue)).completed;
        try {
          const drained = await drain(() => bareProgress(bench, queue), `${count} bare pg-boss jobs`, capSeconds * 1000);
          if (!drained) capped.push(`run ${run + 1}: no-op baseline capped`);
          memory.addBaseline('worker', 'throughput peak', readMemory(worker.pid)?.hwmMb ?? NaN);
          const { completed } = await bareProgress(bench, queue);
          const rate = completed / (await bareSpanSeconds(bench, queue));
          noop.push(rate);
          noopCpu.push((readCpuMs(worker.pid) - cpu0) / Math.max(1, completed - done0));
          ctx.log(`  run ${run + 1}: bare pg-boss no-op ${rate.toFixed(0)} jobs/s`);
        } finally {
          await stopChild(worker.child);
        }
      };
      const doPlain = async () => {
        const mediaDir = mkdtempSync(path.join(ctx.tmp, 'media-plain-'));
        const spec: PipelineSpec = { count, concurrency, capSeconds, mediaDir, ...image64 };
        const child = forkChild('./pipeline-baseline.ts', {
          logFile: path.join(ctx.tmp, 'pipeline-baseline.log'),
          env: { BENCH_PIPELINE: JSON.stringify(spec) },
        });
        try {
          const r = await waitForMessage<{ done: number; perSecond: number; cpuMsPerImage: number; capped: boolean }>(
            child,
            'result',
            (capSeconds + 60) * 1000,
          );
          if (r.capped) capped.push(`run ${run + 1}: plain loop ${r.done.toLocaleString('en')} in the cap`);
          plain.push(r.perSecond);
          plainCpu.push(r.cpuMsPerImage);
          ctx.log(`  run ${run + 1}: plain loop, same image work ${r.perSecond.toFixed(0)} images/s`);
        } finally {
          await stopChild(child, 5_000);
        }
      };
      // Who goes first rotates from run to run.
      const steps = [doOurs, doPlain, doNoop];
      for (let i = 0; i < steps.length; i++) await steps[(i + run) % steps.length]();
    } finally {
      await bench.close();
      await db.drop();
    }
  }
  const plainLabel = `same image work, plain loop × ${concurrency}, no queue`;
  return [
    {
      scenario: 'throughput',
      metric: `${count.toLocaleString('en')} jobs to completed${ctx.quick ? ' (quick: fewer jobs)' : ''}`,
      unit: 'jobs/s',
      ours,
      baseline: plain,
      baselineLabel: plainLabel,
      better: 'higher',
      target: { text: '≥ 80% of baseline', check: (_o, r) => (r ?? 0) >= 0.8 },
      note:
        `ours: 64×64 PNG, local generator at 0 ms, default worker settings, timed from the first fetch to the last job completed (DB clock); ` +
        `baseline: render, normalizeImage, makeThumbnail and two storage.write (fsync) per image, ${concurrency} at a time in one process, wall clock` +
        `${capped.length ? `; capped runs are rated over the jobs done: ${capped.join('; ')}` : ''}.`,
    },
    {
      scenario: 'throughput',
      metric: 'jobs to completed, reference: bare queue',
      unit: 'jobs/s',
      ours,
      baseline: noop,
      baselineLabel: 'bare pg-boss, no-op handler',
      better: 'higher',
    },
    {
      scenario: 'throughput',
      metric: 'worker CPU per job',
      unit: 'ms',
      ours: oursCpu,
      baseline: plainCpu,
      baselineLabel: 'plain loop, per image',
      better: 'lower',
      ratioAsTimes: true,
      note: 'CPU (user+system) of the worker process from ready to drained, per job completed in that time; Postgres CPU not included.',
    },
    {
      scenario: 'throughput',
      metric: 'worker CPU per job, reference',
      unit: 'ms',
      ours: oursCpu,
      baseline: noopCpu,
      baselineLabel: 'bare pg-boss no-op worker',
      better: 'lower',
      ratioAsTimes: true,
    },
    { scenario: 'throughput', metric: 'bulk enqueue (row + pg-boss job, 500 per tx)', unit: 'jobs/s', ours: enqueueRates, better: 'higher' },
  ];
}

// ---------------------------------------------------------------------------------------------
// 4. In flight, trickle, mixed latencies: bench/worker-scenarios.ts

// ---------------------------------------------------------------------------------------------
// 5. Normalisation

export async function normalizeScenario(ctx: Context): Promise<Measure[]> {
  const spec = { rounds: ctx.runs, imagesPerRound: ctx.quick ? 20 : 120 };
  const child = forkChild('./normalize-bench.ts', { logFile: path.join(ctx.tmp, 'normalize.log'), env: { BENCH_NORMALIZE: JSON.stringify(spec) } });
  try {
    const out = await waitForMessage<{ cores: number; parallel: number; results: { format: string; ours: number; direct: number }[] }>(
      child,
      'result',
      300_000,
    );
    ctx.log(`  ${out.cores} cores, ${out.parallel} images at a time`);
    return (['png', 'webp'] as const).map((format) => {
      const rows = out.results.filter((r) => r.format === format);
      return {
        scenario: 'normalise',
        metric: `1024² → 512² ${format.toUpperCase()} per core`,
        unit: 'img/s',
        ours: rows.map((r) => r.ours),
        baseline: rows.map((r) => r.direct),
        baselineLabel: 'sharp directly, same output',
        better: 'higher' as const,
        target: { text: '≥ 90% of baseline', check: (_o: number, r: number | undefined) => (r ?? 0) >= 0.9 },
        note:
          format === 'png'
            ? `normalizeImage vs sharp(input).resize(512,512).png({compressionLevel:6}) / .webp({quality:90}); ${out.cores} cores, ${out.parallel} at a time, ${spec.imagesPerRound} images per round.`
            : undefined,
      };
    });
  } finally {
    await stopChild(child, 5_000);
  }
}

// ---------------------------------------------------------------------------------------------
// 6. Memory (collected along the way)

export class MemoryLog {
  readonly entries: { process: 'api' | 'worker'; phase: string; ours: number[]; baseline: number[]; description: string }[] = [];

  private entry(process: 'api' | 'worker', phase: string, description = '') {
    let e = this.entries.find((x) => x.process === process && x.phase === phase);
    if (!e) {
      e = { process, phase, ours: [], baseline: [], description };
      this.entries.push(e);
    }
    if (description && !e.description) e.description = description;
    return e;
  }

  add(process: 'api' | 'worker', phase: string, mb: number, description: string): void {
    this.entry(process, phase, description).ours.push(mb);
  }

  addBaseline(process: 'api' | 'worker', phase: string, mb: number): void {
    this.entry(process, phase).baseline.push(mb);
  }

  measures(): Measure[] {
    return this.entries.map((e) => ({
      scenario: 'memory',
      metric: `${e.process} RSS, ${e.phase}`,
      unit: 'MB',
      ours: e.ours,
      ...(e.baseline.length ? { baseline: e.baseline, baselineLabel: e.process === 'api' ? 'direct-pg load process' : 'bare pg-boss worker' } : {}),
      better: 'lower' as const,
      ratioAsTimes: true,
    }));
  }
}

/** Runs ours and the baseline in turn, swapping who goes first on every run, so neither always warms up the other. */
export async function alternate(run: number, ours: () => Promise<void>, base: () => Promise<void>): Promise<void> {
  for (const step of run % 2 === 0 ? [ours, base] : [base, ours]) await step();
}
