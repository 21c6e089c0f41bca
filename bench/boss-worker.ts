// Child process: bare pg-boss, the baseline of the pickup and queue-throughput scenarios.
//   BENCH_MODE=poll  one default work() per queue in BENCH_QUEUES (batchSize 1, 2 s polling, no
//                    LISTEN/NOTIFY); each handler start is reported over IPC with its time.
//   BENCH_MODE=noop  work() on BENCH_QUEUE with the service's batch settings and pg-boss constructor
//                    (createBoss), a handler that does nothing.
import { PgBoss, type JobWithMetadata } from 'pg-boss';
import { parseConfig } from '../src/config.ts';
import { createLogger } from '../src/logger.ts';
import { createBoss } from '../src/queue/queue.ts';
import { nowMs } from './common.ts';

const send = (m: Record<string, unknown>) => process.send?.(m);
const url = process.env.BENCH_DATABASE_URL!;
let boss: PgBoss | undefined;
let handled = 0;

async function stop(code: number): Promise<never> {
  const timer = setTimeout(() => process.exit(code || 1), 10_000);
  timer.unref();
  try {
    await boss?.stop({ graceful: true, timeout: 5_000 });
  } catch {
    // exiting anyway
  }
  process.exit(code);
}
process.on('disconnect', () => void stop(1));
process.on('SIGTERM', () => void stop(0));
process.on('message', (m: { cmd: string; id: number }) => {
  if (m.cmd === 'stop') void stop(0);
  else if (m.cmd === 'stats') send({ type: 'reply', id: m.id, handled, memory: process.memoryUsage() });
  else send({ type: 'reply', id: m.id, error: `unknown command ${m.cmd}` });
});

try {
  if (process.env.BENCH_MODE === 'poll') {
    boss = new PgBoss({ connectionString: url, max: 10, application_name: 'bench:poll-baseline' });
    boss.on('error', (err) => console.error('queue error', err));
    await boss.start();
    for (const queue of process.env.BENCH_QUEUES!.split(',')) {
      // pg-boss defaults: batchSize 1, pollingIntervalSeconds 2.
      await boss.work(queue, async ([job]) => {
        send({ type: 'start', jobId: job.id, t: nowMs() });
        handled++;
      });
    }
  } else {
    const config = parseConfig(process.env);
    boss = createBoss(url, config.DATABASE_POOL_MAX, config, createLogger('warn'));
    await boss.start();
    // The same options as startWorker gives the generate queue.
    const batchSize = Math.min(config.WORKER_BATCH_SIZE, config.WORKER_CONCURRENCY);
    await boss.work(
      process.env.BENCH_QUEUE!,
      {
        burstWhenBatchFull: true,
        pollingIntervalSeconds: config.WORKER_POLL_INTERVAL_SECONDS,
        notifyPollingIntervalSeconds: config.WORKER_POLL_INTERVAL_SECONDS,
        batchSize,
        localConcurrency: Math.ceil(config.WORKER_CONCURRENCY / batchSize),
        includeMetadata: true as const,
        perJobResults: true as const,
      },
      async (jobs: JobWithMetadata<unknown>[]) => {
        handled += jobs.length;
        return jobs.map((job) => ({ id: job.id, status: 'completed' as const }));
      },
    );
  }
  send({ type: 'ready', pid: process.pid });
} catch (err) {
  send({ type: 'fatal', error: err instanceof Error ? (err.stack ?? err.message) : String(err) });
  await stop(1);
}
