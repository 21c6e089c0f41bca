// One try of one webhook delivery, in a slot of its own: a slow receiver holds only its own slot. A
// failed try fails the queue job, which pg-boss retries with backoff.
import type { PgBoss } from 'pg-boss';
import type { Metrics } from '../metrics.ts';
import { WEBHOOK } from '../queue/queue.ts';
import { createWebhookDelivery, type DeliveryDeps } from '../webhooks/webhook.service.ts';
import type { SlotJob } from './slots.ts';

export interface WebhookHandlerDeps extends DeliveryDeps {
  boss: PgBoss;
  metrics: Metrics;
}

export function createWebhookHandler(deps: WebhookHandlerDeps): (job: SlotJob<'webhook'>, signal: AbortSignal) => Promise<void> {
  const deliver = createWebhookDelivery(deps);
  return async (job, signal) => {
    const attempt = { id: job.id, retryCount: job.retryCount };
    try {
      // delivered, refused (never retried), deferred (handed back to the queue as a new job), skipped:
      // in every case this queue job is done.
      const outcome = await deliver(job.data.deliveryId, job.retryCount >= job.retryLimit, signal);
      deps.metrics.webhookDeliveries.inc({ outcome });
      await deps.boss.complete(WEBHOOK, attempt);
    } catch (err) {
      deps.metrics.webhookDeliveries.inc({ outcome: 'failed' });
      await deps.boss.fail(WEBHOOK, attempt, { error: (err as Error).message }).catch((failErr: unknown) => {
        deps.logger.warn({ err: failErr, deliveryId: job.data.deliveryId }, 'could not record a failed webhook try; it is retried after its expiry');
      });
    }
  };
}
