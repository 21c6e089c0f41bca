// pg-boss wiring: the queue names and payloads, the queue policy (retries, backoff, expiry), and
// enqueueing inside the caller's transaction.
import { PgBoss, fromKysely } from 'pg-boss';
import type { Config } from '../config.ts';
import type { Tx } from '../db/database.ts';
import type { Logger } from '../logger.ts';

/** Every queue and the payload its jobs carry. Payloads carry ids, never data. */
export interface QueuePayloads {
  /** Generate the images of one job. */
  generate: { jobId: string };
  /** A generate job pg-boss gave up on (retries spent, or expired on its last attempt). */
  'generate-dead': { jobId: string };
  /** Deliver one webhook (a row of webhook_deliveries). */
  webhook: { deliveryId: string };
  /** Periodic housekeeping (scheduled by pg-boss's cron, run by one worker at a time). */
  maintenance: Record<string, never>;
  /** Deletes finished jobs past JOB_RETENTION_DAYS (scheduled like maintenance, one worker at a time). */
  retention: Record<string, never>;
}
export type QueueName = keyof QueuePayloads;

export const GENERATE = 'generate' satisfies QueueName;
export const GENERATE_DEAD = 'generate-dead' satisfies QueueName;
export const MAINTENANCE = 'maintenance' satisfies QueueName;
export const RETENTION = 'retention' satisfies QueueName;
export const WEBHOOK = 'webhook' satisfies QueueName;

export type QueueConfig = Pick<
  Config,
  | 'JOB_RETRY_LIMIT'
  | 'JOB_RETRY_DELAY_SECONDS'
  | 'JOB_RETRY_DELAY_MAX_SECONDS'
  | 'JOB_TIMEOUT_SECONDS'
  | 'JOB_HEARTBEAT_SECONDS'
  | 'WORKER_SUPERVISE_INTERVAL_SECONDS'
  | 'QUEUE_RETENTION_DAYS'
>;

export function createBoss(databaseUrl: string, poolMax: number, config: QueueConfig, logger: Logger): PgBoss {
  const boss = new PgBoss({
    connectionString: databaseUrl,
    max: poolMax,
    application_name: 'media-gen:pg-boss',
    // Our workers are woken by the job_events NOTIFY of the jobs table (src/jobs/job.events.ts), not by
    // pg-boss's own: no listener here, and no NOTIFY on each send (measured: sends are ~40% cheaper).
    useListenNotify: false,
    // Expired and heart-beat-less jobs are found by supervision; this bounds crash detection.
    superviseIntervalSeconds: config.WORKER_SUPERVISE_INTERVAL_SECONDS,
    monitorIntervalSeconds: Math.max(1, Math.min(60, config.WORKER_SUPERVISE_INTERVAL_SECONDS)),
  });
  // pg-boss reports database trouble as events; a lost connection must not crash the process.
  boss.on('error', (err) => logger.error({ err }, 'queue error'));
  boss.on('warning', (warning) => logger.warn({ warning }, 'queue warning'));
  return boss;
}

/** Retry, backoff and expiry of a generate job, from configuration. */
export function generatePolicy(config: QueueConfig) {
  return {
    retryLimit: config.JOB_RETRY_LIMIT,
    retryDelay: config.JOB_RETRY_DELAY_SECONDS,
    retryBackoff: true,
    retryDelayMax: config.JOB_RETRY_DELAY_MAX_SECONDS,
    expireInSeconds: config.JOB_TIMEOUT_SECONDS,
    heartbeatSeconds: config.JOB_HEARTBEAT_SECONDS,
  };
}

/**
 * Creates the queues once. Queue-level settings are only defaults: every job carries the policy of the
 * configuration that sent it (see enqueueGenerate), so a changed setting applies to new jobs at once.
 * Partitioned: a queue of its own keeps its statistics fresh as it fills (see STACK notes in README).
 */
export async function ensureQueues(boss: PgBoss, config: QueueConfig): Promise<void> {
  const queues: [QueueName, Parameters<PgBoss['createQueue']>[1]][] = [
    [GENERATE_DEAD, { retryLimit: 10, retryBackoff: true, partition: true }],
    [WEBHOOK, { retryLimit: 8, retryBackoff: true, retryDelay: 1, retryDelayMax: 300 }],
    [MAINTENANCE, { policy: 'singleton', retryLimit: 0 }],
    [RETENTION, { policy: 'singleton', retryLimit: 0 }],
    [GENERATE, { ...generatePolicy(config), deadLetter: GENERATE_DEAD, partition: true }],
  ];
  // How long pg-boss keeps a finished entry (it has no archive since v10: its maintenance deletes them).
  const deleteAfterSeconds = config.QUEUE_RETENTION_DAYS * 86_400;
  for (const [name, options] of queues) {
    const existing = await boss.getQueue(name);
    if (!existing) {
      await boss.createQueue(name, { ...options, deleteAfterSeconds });
      continue;
    }
    // Queues created by an earlier version had pg-boss's NOTIFY on; nothing listens to it any more.
    if (existing.notify) await boss.updateQueue(name, { notify: false });
    // Applies to entries created from now on (each entry keeps the setting it was created with).
    if (existing.deleteAfterSeconds !== deleteAfterSeconds) await boss.updateQueue(name, { deleteAfterSeconds });
  }
}

/**
 * Enqueues a generate job in the caller's transaction, so it exists exactly when the job row commits.
 * The pg-boss job id is the job's own id: `pgboss.job.id = jobs.id` in psql.
 */
export async function enqueueGenerate(boss: PgBoss, trx: Tx, jobId: string, config: QueueConfig, priority = 0): Promise<void> {
  const payload: QueuePayloads['generate'] = { jobId };
  await boss.send(GENERATE, payload, { ...generatePolicy(config), db: fromKysely(trx), id: jobId, priority, deadLetter: GENERATE_DEAD });
}
