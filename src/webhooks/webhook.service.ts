// Webhooks: a delivery row and its queue entry are written in the transaction of the job's change;
// a worker POSTs the payload signed the way Replicate signs (Standard Webhooks: `webhook-id`,
// `webhook-timestamp`, `webhook-signature` = v1,base64(HMAC-SHA256(key, `${id}.${timestamp}.${body}`))),
// retried with backoff by the queue, every try recorded on the row.
import { createHmac, randomUUID } from 'node:crypto';
import type { LookupFunction } from 'node:net';
import got from 'got';
import { sql } from 'kysely';
import { fromKysely, type PgBoss } from 'pg-boss';
import { getKeyWebhookSecret } from '../auth/api-key.repository.ts';
import { LOCAL_PRINCIPAL_ID } from '../auth/principal.ts';
import type { Database, Tx } from '../db/database.ts';
import { AppError } from '../errors.ts';
import type { JobRow } from '../jobs/job.repository.ts';
import { toStatusView } from '../jobs/job.view.ts';
import type { Logger } from '../logger.ts';
import { createHostLimiter, type HostLimiter } from '../net/host-limiter.ts';
import { checkOutboundUrl, createOutboundAgents, urlShapeProblem, type OutboundAgents } from '../net/outbound.ts';
import { WEBHOOK, type QueuePayloads } from '../queue/queue.ts';

export type WebhookEvent = 'start' | 'progress' | 'completed';

export interface WebhookConfig {
  WEBHOOK_SECRET?: string;
  WEBHOOK_RETRY_LIMIT: number;
  WEBHOOK_TIMEOUT_MS: number;
  /** Non-public ranges webhooks may reach anyway (development receivers); none by default. */
  WEBHOOK_ALLOWED_CIDRS?: readonly string[];
  /** Deliveries in flight per destination host in one worker process. */
  WEBHOOK_HOST_CONCURRENCY: number;
}

/** Refuses (422, naming the field) a webhook_url that is not http(s), has credentials, or points inward. */
export async function checkWebhookUrl(url: string, config: WebhookConfig, lookup?: LookupFunction): Promise<void> {
  const problem = await checkOutboundUrl(url, { allowedCidrs: config.WEBHOOK_ALLOWED_CIDRS, lookup });
  if (problem) throw new AppError('unsafe_url', `webhook_url ${problem}`, [{ path: '/body/webhook_url', message: problem }]);
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
  await boss.send(WEBHOOK, payload, { db: fromKysely(trx), ...deliveryJobOptions(config, config.WEBHOOK_RETRY_LIMIT) });
}

function deliveryJobOptions(config: WebhookConfig, retryLimit: number) {
  return {
    retryLimit,
    retryDelay: 1,
    retryBackoff: true,
    retryDelayMax: 300,
    expireInSeconds: Math.ceil((config.WEBHOOK_TIMEOUT_MS + HOST_WAIT_MS) / 1000) + 30,
  };
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
  boss: PgBoss;
  config: WebhookConfig;
  logger: Logger;
  /** Resolves receivers' host names (tests simulate DNS rebinding with it); dns.lookup by default. */
  lookup?: LookupFunction;
}

/**
 * What one call did: `delivered`; `refused` (the URL may not be called: failed for good, no retry);
 * `deferred` (its host had no free place: handed back to the queue for later, no try spent);
 * `skipped` (already settled).
 */
export type DeliveryOutcome = 'delivered' | 'refused' | 'deferred' | 'skipped';

export type DeliverWebhook = (deliveryId: string, lastTry: boolean, signal?: AbortSignal) => Promise<DeliveryOutcome>;

/**
 * The delivery of one worker: its guarded agents and per-host places are made once, here, and shared by
 * its deliveries.
 */
export function createWebhookDelivery(deps: DeliveryDeps): DeliverWebhook {
  const outbound: Outbound = {
    agents: createOutboundAgents({ allowedCidrs: deps.config.WEBHOOK_ALLOWED_CIDRS, lookup: deps.lookup }),
    hosts: createHostLimiter(deps.config.WEBHOOK_HOST_CONCURRENCY),
  };
  return (deliveryId, lastTry, signal) => deliverWebhook(deps, outbound, deliveryId, lastTry, signal);
}

/**
 * Tries a delivery once. Resolves when the receiver answered 2xx (or it was delivered before); throws
 * WebhookDeliveryError otherwise, so the queue retries it. `lastTry` marks the row failed for good.
 */
async function deliverWebhook(deps: DeliveryDeps, outbound: Outbound, deliveryId: string, lastTry: boolean, signal?: AbortSignal): Promise<DeliveryOutcome> {
  const delivery = await deps.db
    .selectFrom('webhook_deliveries')
    .innerJoin('jobs', 'jobs.id', 'webhook_deliveries.job_id')
    .selectAll('webhook_deliveries')
    .select('jobs.owner_id')
    .where('webhook_deliveries.id', '=', deliveryId)
    .executeTakeFirst();
  if (!delivery || delivery.status !== 'pending') return 'skipped';
  const secret = await getWebhookSecret(deps.db, delivery.owner_id, deps.config.WEBHOOK_SECRET);
  const body = JSON.stringify(delivery.payload);
  const timestamp = Math.floor(Date.now() / 1000);
  const started = performance.now();
  let statusCode: number | undefined;
  let error: string | undefined;
  let refused = false;
  const headers = {
    'content-type': 'application/json',
    'user-agent': 'media-gen-service-webhooks/1',
    'webhook-id': delivery.id,
    'webhook-timestamp': String(timestamp),
    'webhook-signature': signWebhook(secret, delivery.id, timestamp, body),
  };
  const host = hostOf(delivery.url);
  try {
    statusCode = await post(deps, outbound, delivery.url, body, headers, signal);
    if (statusCode < 200 || statusCode >= 300) error = `the receiver answered ${statusCode}`;
  } catch (err) {
    if (err instanceof HostBusy) {
      await handBack(deps, delivery.id, delivery.attempts);
      deps.logger.debug({ jobId: delivery.job_id, deliveryId, host }, 'webhook deferred: its host has no free place');
      return 'deferred';
    }
    refused = (err as { code?: string }).code === 'EFORBIDDENADDRESS';
    error = refused ? `refused: ${(err as Error).message}` : (err as Error).message;
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
      status: ok ? 'delivered' : lastTry || refused ? 'failed' : 'pending',
      ...(ok ? { delivered_at: sql`now()` } : {}),
    })
    .where('id', '=', deliveryId)
    .execute();
  // The host only: a webhook_url's path and query may hold the receiver's own secrets.
  const log = deps.logger.child({ jobId: delivery.job_id, deliveryId, event: delivery.event, host });
  if (ok) {
    log.info({ statusCode }, 'webhook delivered');
    return 'delivered';
  }
  if (refused) {
    // Retrying cannot help: the address is one we will not call.
    log.warn({ error }, 'webhook refused');
    return 'refused';
  }
  log.warn({ statusCode, error, lastTry }, 'webhook delivery failed');
  throw new WebhookDeliveryError(error);
}

/** The most of a receiver's answer we read; the rest is never downloaded. */
export const RESPONSE_BYTES_MAX = 64 * 1024;
/** How long a delivery waits for a place at its host before it is handed back to the queue. */
const HOST_WAIT_MS = 1000;

class HostBusy extends Error {}

interface Outbound {
  agents: OutboundAgents;
  hosts: HostLimiter;
}
function hostOf(url: string): string {
  try {
    return new URL(url).hostname;
  } catch {
    return '';
  }
}

/**
 * POSTs once, on a guarded connection (the address connected to must be allowed; no redirects), and
 * reads at most RESPONSE_BYTES_MAX of the answer. Resolves with the status code; throws HostBusy when
 * the host had no free place in time, and an error with code EFORBIDDENADDRESS when refused.
 */
async function post(deps: DeliveryDeps, outbound: Outbound, url: string, body: string, headers: Record<string, string>, signal?: AbortSignal): Promise<number> {
  const shape = urlShapeProblem(url);
  if (shape) throw Object.assign(new Error(`the URL ${shape}`), { code: 'EFORBIDDENADDRESS' });
  const { agents, hosts } = outbound;
  const release = await hosts.acquire(hostOf(url), HOST_WAIT_MS);
  if (!release) throw new HostBusy();
  try {
    const stream = got.stream.post(url, {
      body,
      headers,
      agent: agents,
      timeout: { request: deps.config.WEBHOOK_TIMEOUT_MS },
      // The worker stopping past its grace period (or the try's deadline) ends the call: the queue retries it.
      ...(signal ? { signal } : {}),
      retry: { limit: 0 }, // the queue retries, with backoff, durably
      followRedirect: false,
      throwHttpErrors: false,
      decompress: false,
    });
    const statusCode = await new Promise<number>((resolve, reject) => {
      stream.once('response', (res: { statusCode: number }) => resolve(res.statusCode));
      stream.once('error', reject);
    });
    try {
      let read = 0;
      for await (const chunk of stream) {
        read += (chunk as Buffer).length;
        if (read >= RESPONSE_BYTES_MAX) break; // leaving the loop destroys the stream: the rest is never read
      }
    } catch {
      // The answer's status is what counts; a body cut short or timed out changes nothing.
    }
    stream.destroy();
    return statusCode;
  } finally {
    release();
  }
}

/** Re-queues a delivery that found its host full, with the tries it has left, a little later. */
async function handBack(deps: DeliveryDeps, deliveryId: string, attempts: number): Promise<void> {
  const payload: QueuePayloads['webhook'] = { deliveryId };
  const retryLimit = Math.max(0, deps.config.WEBHOOK_RETRY_LIMIT - attempts);
  // 1–5 s, spread so that the deliveries of a busy host do not all come back at once.
  await deps.boss.send(WEBHOOK, payload, { ...deliveryJobOptions(deps.config, retryLimit), startAfter: 1 + Math.floor(Math.random() * 5) });
}
