// Webhooks: a delivery row and its queue entry are written in the transaction of the job's change;
// a worker POSTs the payload signed the way Replicate signs (Standard Webhooks: `webhook-id`,
// `webhook-timestamp`, `webhook-signature` = v1,base64(HMAC-SHA256(key, `${id}.${timestamp}.${body}`))),
// retried with backoff by the queue, every try recorded on the row.
import { createHmac, randomUUID } from 'node:crypto';
import got from 'got';
import { sql } from 'kysely';
import { fromKysely, type PgBoss } from 'pg-boss';
import { getKeyWebhookSecret } from '../auth/api-key.repository.ts';
import { LOCAL_PRINCIPAL_ID } from '../auth/principal.ts';
import type { Database, Tx } from '../db/database.ts';
import type { JobRow } from '../jobs/job.repository.ts';
import { toStatusView } from '../jobs/job.view.ts';
import type { Logger } from '../logger.ts';
import { WEBHOOK, type QueuePayloads } from '../queue/queue.ts';

export type WebhookEvent = 'start' | 'progress' | 'completed';

export interface WebhookConfig {
  WEBHOOK_SECRET?: string;
  WEBHOOK_RETRY_LIMIT: number;
  WEBHOOK_TIMEOUT_MS: number;
}

/** Queues a delivery of `event` for the job, if it has a webhook that wants this event. */
export async function enqueueWebhook(boss: PgBoss, trx: Tx, job: JobRow, event: WebhookEvent, config: WebhookConfig): Promise<void> {
  if (!job.webhook_url || !(job.webhook_events_filter ?? ['completed']).includes(event)) return;
  const id = randomUUID();
  await trx
    .insertInto('webhook_deliveries')
    .values({ id, job_id: job.id, event, url: job.webhook_url, payload: JSON.stringify(toStatusView(job)) })
    .execute();
  const payload: QueuePayloads['webhook'] = { deliveryId: id };
  await boss.send(WEBHOOK, payload, {
    db: fromKysely(trx),
    retryLimit: config.WEBHOOK_RETRY_LIMIT,
    retryDelay: 1,
    retryBackoff: true,
    retryDelayMax: 300,
    expireInSeconds: Math.ceil(config.WEBHOOK_TIMEOUT_MS / 1000) + 30,
  });
}

/**
 * The secret a key's deliveries are signed with: its own, kept in the database for every process
 * (WEBHOOK_SECRET, when set, is the anonymous local principal's).
 */
export async function getWebhookSecret(db: Database, ownerId: string, configuredLocal?: string): Promise<string> {
  if (configuredLocal && ownerId === LOCAL_PRINCIPAL_ID) return configuredLocal;
  return getKeyWebhookSecret(db, ownerId);
}

/** `v1,<base64 signature>` of a delivery, as Standard Webhooks (and Replicate) define it. */
export function signWebhook(secret: string, id: string, timestamp: number, body: string): string {
  const key = Buffer.from(secret.startsWith('whsec_') ? secret.slice('whsec_'.length) : secret, 'base64');
  return `v1,${createHmac('sha256', key).update(`${id}.${timestamp}.${body}`).digest('base64')}`;
}

export class WebhookDeliveryError extends Error {}

export interface DeliveryDeps {
  db: Database;
  config: WebhookConfig;
  logger: Logger;
}

/**
 * Tries a delivery once. Resolves when the receiver answered 2xx (or it was delivered before); throws
 * WebhookDeliveryError otherwise, so the queue retries it. `lastTry` marks the row failed for good.
 */
export async function deliverWebhook(deps: DeliveryDeps, deliveryId: string, lastTry: boolean): Promise<void> {
  const delivery = await deps.db.selectFrom('webhook_deliveries').selectAll().where('id', '=', deliveryId).executeTakeFirst();
  if (!delivery || delivery.status !== 'pending') return;
  const { owner_id } = await deps.db.selectFrom('jobs').select('owner_id').where('id', '=', delivery.job_id).executeTakeFirstOrThrow();
  const secret = await getWebhookSecret(deps.db, owner_id, deps.config.WEBHOOK_SECRET);
  const body = JSON.stringify(delivery.payload);
  const timestamp = Math.floor(Date.now() / 1000);
  const started = performance.now();
  let statusCode: number | undefined;
  let error: string | undefined;
  try {
    const res = await got.post(delivery.url, {
      body,
      headers: {
        'content-type': 'application/json',
        'user-agent': 'media-gen-service-webhooks/1',
        'webhook-id': delivery.id,
        'webhook-timestamp': String(timestamp),
        'webhook-signature': signWebhook(secret, delivery.id, timestamp, body),
      },
      timeout: { request: deps.config.WEBHOOK_TIMEOUT_MS },
      retry: { limit: 0 }, // the queue retries, with backoff, durably
      followRedirect: false,
      throwHttpErrors: false,
    });
    statusCode = res.statusCode;
    if (statusCode < 200 || statusCode >= 300) error = `the receiver answered ${statusCode}`;
  } catch (err) {
    error = (err as Error).message;
  }
  const ok = error === undefined;
  const entry = { at: new Date().toISOString(), status_code: statusCode ?? null, error: error ?? null, ms: Math.round(performance.now() - started) };
  await deps.db
    .updateTable('webhook_deliveries')
    .set({
      attempts: sql`attempts + 1`,
      last_status_code: statusCode ?? null,
      last_error: error ?? null,
      history: sql`history || ${JSON.stringify([entry])}::jsonb`,
      status: ok ? 'delivered' : lastTry ? 'failed' : 'pending',
      ...(ok ? { delivered_at: sql`now()` } : {}),
    })
    .where('id', '=', deliveryId)
    .execute();
  const log = deps.logger.child({ jobId: delivery.job_id, deliveryId, event: delivery.event });
  if (ok) {
    log.info({ statusCode }, 'webhook delivered');
    return;
  }
  log.warn({ statusCode, error, lastTry }, 'webhook delivery failed');
  throw new WebhookDeliveryError(error);
}
