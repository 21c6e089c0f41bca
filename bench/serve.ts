// Child process: the real service (API only or worker only) under test, started through startService
// with configuration from the environment the bench gives it. The worker's provider is the offline
// generator wrapped to time each generate() start and to count jobs in flight; the bench reads those
// counters and this process's memory over IPC.
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

// In-flight accounting: current, maximum, and the time integral (for the time-weighted mean).
const counters = { inflight: 0, maxInflight: 0, started: 0, finished: 0, area: 0, since: nowMs(), last: nowMs(), firstStart: 0, lastEnd: 0 };
function change(delta: number): void {
  const t = nowMs();
  counters.area += counters.inflight * (t - counters.last);
  counters.last = t;
  counters.inflight += delta;
  if (counters.inflight > counters.maxInflight) counters.maxInflight = counters.inflight;
}

function measuredProvider(inner: ImageProvider): ImageProvider {
  return {
    name: inner.name,
    async generate(request, signal, hooks) {
      const t = nowMs();
      if (reportStarts) send({ type: 'start', jobId: request.jobId, t });
      if (counters.started === 0) counters.firstStart = t;
      counters.started++;
      change(+1);
      try {
        return await inner.generate(request, signal, hooks);
      } finally {
        change(-1);
        counters.finished++;
        counters.lastEnd = nowMs();
      }
    },
  };
}

// "Handler start": the moment pg-boss hands a fetched batch of the generate queue to our handler.
// Measured by wrapping the handler at registration (this process only; nothing in src changes).
if (reportStarts) {
  const proto = PgBoss.prototype as unknown as { work: (...args: unknown[]) => Promise<string> };
  const work = proto.work;
  proto.work = function (this: PgBoss, ...args: unknown[]) {
    const handler = args[args.length - 1];
    if (args[0] === 'generate' && typeof handler === 'function') {
      args[args.length - 1] = (jobs: { id: string; data?: { jobId?: string } }[]) => {
        const t = nowMs();
        for (const job of jobs) send({ type: 'handler', jobId: job.data?.jobId ?? job.id, t });
        return handler(jobs);
      };
    }
    return work.apply(this, args);
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
        lastEnd: counters.lastEnd,
        memory: process.memoryUsage(),
      });
      break;
    }
    case 'reset':
      Object.assign(counters, { maxInflight: counters.inflight, started: 0, finished: 0, area: 0, since: nowMs(), last: nowMs(), firstStart: 0, lastEnd: 0 });
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
    provider: role === 'worker' ? measuredProvider(createLocalProvider({ latencyMs: config.LOCAL_PROVIDER_LATENCY_MS })) : undefined,
  });
  send({ type: 'ready', port: service.port, pid: process.pid });
} catch (err) {
  send({ type: 'fatal', error: err instanceof Error ? (err.stack ?? err.message) : String(err) });
  await stop(1);
}
