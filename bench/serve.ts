// Child process: the real service (API only or worker only) under test, started through startService
// with configuration from the environment the bench gives it. The worker's provider is the offline
// generator wrapped to time each generate() start and to count jobs in flight; the bench reads those
// counters, the worker's busy slots and this process's memory over IPC. With BENCH_LATENCY_BY_PROMPT=1
// a prompt containing `latency=<ms>ms` takes that long (mixed-latency scenarios); any other prompt takes
// LOCAL_PROVIDER_LATENCY_MS.
import pg from 'pg';
import { PgBoss } from 'pg-boss';
import { parseConfig } from '../src/config.ts';
import { createLogger } from '../src/logger.ts';
import { createLocalProvider } from '../src/providers/local.provider.ts';
import type { ImageProvider } from '../src/providers/provider.ts';
import { startService, type Service } from '../src/service.ts';
import { nowMs } from './common.ts';

const send = (m: Record<string, unknown>) => process.send?.(m);
const role = process.env.BENCH_ROLE === 'api' ? 'api' : 'worker';
const reportStarts = process.env.BENCH_REPORT_STARTS === '1';
const latencyByPrompt = process.env.BENCH_LATENCY_BY_PROMPT === '1';

// In-flight accounting: current, maximum, and the time integral (for the time-weighted mean).
const freshCounters = (inflight: number) => ({
  inflight,
  maxInflight: inflight,
  maxAt: 0,
  started: 0,
  finished: 0,
  area: 0,
  since: nowMs(),
  last: nowMs(),
  firstStart: 0,
  firstEnd: 0,
  lastEnd: 0,
});
const counters = freshCounters(0);
function change(delta: number): void {
  const t = nowMs();
  counters.area += counters.inflight * (t - counters.last);
  counters.last = t;
  counters.inflight += delta;
  if (counters.inflight > counters.maxInflight) {
    counters.maxInflight = counters.inflight;
    counters.maxAt = t;
  }
}

/** Jobs in generate() now, by their latency (ms). */
const inflightByLatency = new Map<number, number>();

function measuredProvider(defaultLatencyMs: number): ImageProvider {
  const providers = new Map<number, ImageProvider>();
  const providerFor = (latencyMs: number) => {
    let p = providers.get(latencyMs);
    if (!p) providers.set(latencyMs, (p = createLocalProvider({ latencyMs })));
    return p;
  };
  return {
    name: 'local',
    async generate(request, signal, hooks) {
      const t = nowMs();
      if (reportStarts) send({ type: 'start', jobId: request.jobId, t });
      if (counters.started === 0) counters.firstStart = t;
      counters.started++;
      change(+1);
      const asked = latencyByPrompt ? /\blatency=(\d+)ms\b/.exec(request.prompt) : null;
      const latencyMs = asked ? Number(asked[1]) : defaultLatencyMs;
      inflightByLatency.set(latencyMs, (inflightByLatency.get(latencyMs) ?? 0) + 1);
      try {
        return await providerFor(latencyMs).generate(request, signal, hooks);
      } finally {
        inflightByLatency.set(latencyMs, inflightByLatency.get(latencyMs)! - 1);
        change(-1);
        counters.finished++;
        counters.lastEnd = nowMs();
        if (counters.finished === 1) counters.firstEnd = counters.lastEnd;
      }
    },
  };
}

// "Handler start": the moment a fetch of the generate queue returns its jobs, which the slot loop hands
// to its slots at once (src/worker/slots.ts). Measured by wrapping pg-boss's fetch (this process only;
// nothing in src changes), which also counts the generate fetches by the batch size they asked for.
const fetches = { count: 0, jobs: 0, asked: new Map<number, number>() };
{
  type Fetched = { id: string; data?: { jobId?: string } }[];
  const proto = PgBoss.prototype as unknown as { fetch: (name: string, options?: { batchSize?: number }) => Promise<Fetched> };
  const fetchJobs = proto.fetch;
  proto.fetch = async function (this: PgBoss, name: string, options?: { batchSize?: number }) {
    const jobs = await fetchJobs.call(this, name, options);
    if (name === 'generate') {
      const t = nowMs();
      fetches.count++;
      fetches.jobs += jobs.length;
      const asked = options?.batchSize ?? 1;
      fetches.asked.set(asked, (fetches.asked.get(asked) ?? 0) + 1);
      if (reportStarts) for (const job of jobs) send({ type: 'handler', jobId: job.data?.jobId ?? job.id, t });
    }
    return jobs;
  };
}

// "Notified": the moment this process's job_events listener receives a job's `queued` notification
// (the submit transaction has committed). Measured by wrapping pg's Client.emit (this process only).
if (reportStarts) {
  const proto = pg.Client.prototype as unknown as { emit: (event: string | symbol, ...args: unknown[]) => boolean };
  const emit = proto.emit;
  proto.emit = function (this: pg.Client, event: string | symbol, ...args: unknown[]) {
    const msg = args[0] as { channel?: string; payload?: string } | undefined;
    if (event === 'notification' && msg?.channel === 'job_events' && msg.payload?.includes('"queued"')) {
      const t = nowMs();
      const n = JSON.parse(msg.payload) as { job_id: string };
      send({ type: 'notified', jobId: n.job_id, t });
    }
    return emit.call(this, event, ...args);
  };
}

let service: Service | undefined;
let stopping = false;

async function stop(code: number): Promise<never> {
  if (!stopping) {
    stopping = true;
    const timer = setTimeout(() => process.exit(code || 1), 20_000);
    timer.unref();
    try {
      await service?.stop();
    } catch {
      // exiting anyway
    }
  }
  process.exit(code);
}

process.on('disconnect', () => void stop(1)); // the bench died: never outlive it
process.on('SIGTERM', () => void stop(0));
process.on('SIGINT', () => void stop(0));

process.on('message', (m: { cmd: string; id: number }) => {
  const reply = (body: Record<string, unknown>) => send({ type: 'reply', id: m.id, ...body });
  switch (m.cmd) {
    case 'stats': {
      change(0);
      // Mean over the active window: from the first generate() to the last one's end.
      const span = counters.lastEnd - counters.firstStart;
      reply({
        inflight: counters.inflight,
        maxInflight: counters.maxInflight,
        started: counters.started,
        finished: counters.finished,
        meanInflight: span > 0 ? counters.area / span : 0,
        firstStart: counters.firstStart,
        firstEnd: counters.firstEnd,
        lastEnd: counters.lastEnd,
        maxAt: counters.maxAt,
        busySlots: service?.worker?.busySlots() ?? 0,
        fetches: { count: fetches.count, jobs: fetches.jobs, asked: Object.fromEntries(fetches.asked) },
        inflightByLatency: Object.fromEntries(inflightByLatency),
        memory: process.memoryUsage(),
      });
      break;
    }
    case 'reset':
      Object.assign(counters, freshCounters(counters.inflight));
      reply({});
      break;
    case 'stop':
      void stop(0);
      break;
    default:
      reply({ error: `unknown command ${m.cmd}` });
  }
});

try {
  const config = parseConfig(process.env);
  const logger = createLogger(config.LOG_LEVEL, { role });
  service = await startService({
    config,
    databaseUrl: process.env.BENCH_DATABASE_URL!,
    logger,
    api: role === 'api',
    worker: role === 'worker',
    provider: role === 'worker' ? measuredProvider(config.LOCAL_PROVIDER_LATENCY_MS) : undefined,
  });
  send({ type: 'ready', port: service.port, pid: process.pid });
} catch (err) {
  send({ type: 'fatal', error: err instanceof Error ? (err.stack ?? err.message) : String(err) });
  await stop(1);
}
