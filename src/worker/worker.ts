// The worker: one slot loop per queue (generate, its dead letters, webhook deliveries, maintenance),
// woken by job_events notifications, plus cancellation of running jobs. Each concern lives in its own
// module; this file only wires them and owns the shutdown order.
import { hostname } from 'node:os';
import type { PgBoss } from 'pg-boss';
import { Gauge } from 'prom-client';
import type { Config } from '../config.ts';
import type { Database } from '../db/database.ts';
import type { JobEventHub } from '../jobs/job.events.ts';
import type { Logger } from '../logger.ts';
import type { MediaStorage } from '../media/storage.ts';
import type { Metrics } from '../metrics.ts';
import type { ImageProvider } from '../providers/provider.ts';
import { GENERATE, GENERATE_DEAD, MAINTENANCE, RETENTION, WEBHOOK } from '../queue/queue.ts';
import type { WebhookConfig } from '../webhooks/webhook.service.ts';
import { createDeadLetterHandler } from './dead-letter.handler.ts';
import { createGenerateHandler } from './generate.handler.ts';
import { createMaintenanceHandler, MAINTENANCE_CRON } from './maintenance.handler.ts';
import { createRetentionHandler, RETENTION_CRON } from './retention.handler.ts';
import { JobStopped, startSlotLoop } from './slots.ts';
import { createWebhookHandler } from './webhook.handler.ts';

export type WorkerConfig = Pick<
  Config,
  | 'WORKER_CONCURRENCY'
  | 'WORKER_BATCH_SIZE'
  | 'IMAGE_CONCURRENCY'
  | 'WORKER_POLL_INTERVAL_SECONDS'
  | 'WEBHOOK_CONCURRENCY'
  | 'SHUTDOWN_GRACE_SECONDS'
  | 'MAX_IMAGE_PIXELS'
  | 'IDEMPOTENCY_TTL_HOURS'
  | 'MAX_IMAGE_BYTES'
  | 'JOB_RETENTION_DAYS'
> &
  WebhookConfig;

export interface WorkerDeps {
  db: Database;
  boss: PgBoss;
  provider: ImageProvider;
  storage: MediaStorage;
  config: WorkerConfig;
  logger: Logger;
  events: JobEventHub;
  metrics: Metrics;
  /** Recorded on each attempt row, to tell which worker ran it (default `<host>:<pid>`). */
  workerName?: string;
}

export interface Worker {
  /** Jobs running now. */
  busySlots(): number;
  /**
   * Stops taking jobs, lets running ones finish within SHUTDOWN_GRACE_SECONDS (cancellation keeps
   * working meanwhile), then hands the rest back to the queue.
   */
  stop(): Promise<void>;
}

/** After the grace period, how long settling the handed-back jobs may take before the worker gives up on it. */
const SETTLE_GRACE_MS = 10_000;

export async function startWorker(deps: WorkerDeps): Promise<Worker> {
  const { config, boss, logger, events } = deps;
  const pollIntervalMs = config.WORKER_POLL_INTERVAL_SECONDS * 1000;
  const giveUp = new AbortController();

  const generate = startSlotLoop({
    boss,
    logger,
    queue: GENERATE,
    slots: config.WORKER_CONCURRENCY,
    fetchMax: config.WORKER_BATCH_SIZE,
    pollIntervalMs,
    run: createGenerateHandler({ ...deps, workerName: deps.workerName ?? `${hostname()}:${process.pid}`, giveUp: giveUp.signal }),
  });
  const deadLetters = startSlotLoop({ boss, logger, queue: GENERATE_DEAD, slots: 10, fetchMax: 10, pollIntervalMs, run: createDeadLetterHandler(deps) });
  const webhooks = startSlotLoop({
    boss,
    logger,
    queue: WEBHOOK,
    slots: config.WEBHOOK_CONCURRENCY,
    fetchMax: config.WEBHOOK_CONCURRENCY,
    pollIntervalMs,
    // Woken by every change of a job; a burst of changes is one fetch.
    minFetchIntervalMs: 50,
    run: createWebhookHandler(deps),
  });
  await boss.schedule(MAINTENANCE, MAINTENANCE_CRON);
  const maintenance = startSlotLoop({ boss, logger, queue: MAINTENANCE, slots: 1, fetchMax: 1, pollIntervalMs: 30_000, run: createMaintenanceHandler(deps) });
  await boss.schedule(RETENTION, RETENTION_CRON);
  const retention = startSlotLoop({ boss, logger, queue: RETENTION, slots: 1, fetchMax: 1, pollIntervalMs: 30_000, run: createRetentionHandler(deps) });

  const cancel = (jobId: string) => generate.abort(jobId, new JobStopped('canceled', 'the job was canceled'));
  // A new job (or one whose retry is due soon) is a `queued` notification; any other change may have
  // queued a webhook delivery.
  const offAny = events.onAny((n) => {
    if (n.status === 'queued') generate.wake();
    else webhooks.wake();
    if (n.status === 'canceled') cancel(n.job_id);
  });
  const offResync = events.onResync(() => {
    // Notifications may have been missed while the listener reconnected: ask the table.
    generate.wake();
    webhooks.wake();
    const ids = generate.runningIds();
    if (ids.length === 0) return;
    deps.db
      .selectFrom('jobs')
      .select('id')
      .where('id', 'in', ids)
      .where('status', '=', 'canceled')
      .execute()
      .then((rows) => rows.forEach((r) => cancel(r.id)))
      .catch((err: unknown) => logger.warn({ err }, 'could not check for cancellations'));
  });

  new Gauge({
    name: 'media_worker_busy_slots',
    help: 'Generate jobs this worker process is running now (of WORKER_CONCURRENCY slots)',
    registers: [deps.metrics.registry],
    collect() {
      this.set(generate.busy());
    },
  });

  logger.info({ provider: deps.provider.name, concurrency: config.WORKER_CONCURRENCY, fetchMax: config.WORKER_BATCH_SIZE }, 'worker started');
  return {
    busySlots: () => generate.busy(),
    async stop() {
      const graceMs = config.SHUTDOWN_GRACE_SECONDS * 1000;
      logger.info({ graceSeconds: config.SHUTDOWN_GRACE_SECONDS, running: generate.busy() }, 'worker draining');
      const deadline = setTimeout(() => giveUp.abort(), graceMs + SETTLE_GRACE_MS);
      try {
        // The cancel listener stays on until the last job has finished or been handed back.
        await Promise.all([generate.stop(graceMs), webhooks.stop(graceMs), deadLetters.stop(graceMs), maintenance.stop(graceMs), retention.stop(graceMs)]);
      } finally {
        clearTimeout(deadline);
        offAny();
        offResync();
      }
    },
  };
}
