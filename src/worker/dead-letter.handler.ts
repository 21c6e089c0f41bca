// Generate jobs pg-boss gave up on (retries spent, or expired on the last attempt) without our handler
// recording the end: the row is failed here. A no-op when the handler already said how the job ended.
import { fromKysely, type PgBoss } from 'pg-boss';
import type { Database } from '../db/database.ts';
import * as jobs from '../jobs/job.repository.ts';
import type { Logger } from '../logger.ts';
import type { Metrics } from '../metrics.ts';
import { GENERATE_DEAD } from '../queue/queue.ts';
import { enqueueWebhook, type WebhookConfig } from '../webhooks/webhook.service.ts';
import type { SlotJob } from './slots.ts';

export interface DeadLetterDeps {
  db: Database;
  boss: PgBoss;
  config: WebhookConfig;
  logger: Logger;
  metrics: Metrics;
}

export function createDeadLetterHandler(deps: DeadLetterDeps): (job: SlotJob<'generate-dead'>) => Promise<void> {
  return async (job) => {
    const { jobId } = job.data;
    const attempts = (job.sourceRetryCount ?? 0) + 1;
    const reason = `gave up after ${attempts} attempts: the worker stopped or timed out on the last one`;
    try {
      const changed = await deps.db.transaction().execute(async (trx) => {
        const row = await jobs.failAbandonedJob(trx, jobId, reason);
        if (row) await enqueueWebhook(deps.boss, trx, row, 'completed', deps.config);
        await deps.boss.complete(GENERATE_DEAD, { id: job.id, retryCount: job.retryCount }, null, { db: fromKysely(trx) });
        return row;
      });
      if (changed) {
        deps.metrics.jobsFinished.inc({ status: 'failed' });
        deps.logger.warn({ jobId }, 'job failed after the queue gave up on it');
      }
    } catch (err) {
      deps.logger.warn({ err, jobId }, 'could not settle a dead-lettered job; the queue retries it');
      await deps.boss.fail(GENERATE_DEAD, { id: job.id, retryCount: job.retryCount }, { error: (err as Error).message }).catch(() => {});
    }
  };
}
