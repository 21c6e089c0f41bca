// Job use cases: submit (row + queue entry in one transaction), read, list, cancel.
import { createHash, randomUUID } from 'node:crypto';
import { fromKysely, type PgBoss } from 'pg-boss';
import { isLimited } from '../auth/limits.ts';
import type { Principal } from '../auth/principal.ts';
import type { Database } from '../db/database.ts';
import { AppError } from '../errors.ts';
import type { components } from '../http/api-types.ts';
import { enqueueGenerate, GENERATE, type QueueConfig } from '../queue/queue.ts';
import { checkWebhookUrl, enqueueWebhook, type WebhookConfig } from '../webhooks/webhook.service.ts';
import * as jobs from './job.repository.ts';
import type { JobRow, JobState } from './job.repository.ts';
import { checkPrompt, resolveParameters } from './parameters.ts';
import { toStatusView, type JobStatusView } from './job.view.ts';

export type GenerateRequest = components['schemas']['GenerateRequest'];
export type JobList = components['schemas']['JobList'];
export type { JobStatusView };

export interface JobServiceDeps {
  db: Database;
  boss: PgBoss;
  queueConfig: QueueConfig;
  webhookConfig: WebhookConfig;
  /** Name of the provider new jobs will run on. */
  provider: string;
  /** Queued jobs one key may have at once (0: no cap). */
  maxQueuedJobs: number;
}

/** Whose jobs a principal sees: its own, or (an operator) everyone's. */
function scopeOf(principal: Principal): jobs.Scope {
  return { ownerId: principal.keyId, all: principal.operator };
}

export interface Submission {
  job: JobRow;
  /** False when an Idempotency-Key repeat returned an existing job. */
  created: boolean;
}

export async function submitJob(deps: JobServiceDeps, principal: Principal, request: GenerateRequest, idempotencyKey?: string): Promise<Submission> {
  checkPrompt(request.prompt);
  const parameters = resolveParameters(request.parameters);
  if (request.webhook_url) await checkWebhookUrl(request.webhook_url, deps.webhookConfig);
  const priority = request.priority ?? 0;
  if (priority > principal.maxPriority) {
    throw new AppError('validation_failed', `priority ${priority} is above this key's maximum of ${principal.maxPriority}`, [
      { path: '/body/priority', message: `must be at most ${principal.maxPriority} for this key` },
    ]);
  }
  const newJob: jobs.NewJob = {
    id: randomUUID(),
    ownerId: principal.keyId,
    prompt: request.prompt,
    parameters,
    provider: deps.provider,
    priority,
    webhookUrl: request.webhook_url,
    webhookEventsFilter: request.webhook_events_filter,
    idempotencyKey,
  };
  if (idempotencyKey) newJob.requestHash = hashRequest(newJob);

  const capped = deps.maxQueuedJobs > 0 && isLimited(principal);
  const job = await deps.db
    .transaction()
    .execute(async (trx) => {
      if (capped) await jobs.capQueuedJobs(trx, deps.maxQueuedJobs);
      const row = await jobs.insertJob(trx, newJob);
      if (row) await enqueueGenerate(deps.boss, trx, row.id, deps.queueConfig, priority);
      return row; // undefined: a repeat of an accepted submission, which gets its job, full queue or not
    })
    .catch((err: unknown) => {
      if ((err as { code?: string }).code !== jobs.QUEUED_CAP_EXCEEDED) throw err;
      const full = new AppError('rate_limited', `this key already has ${deps.maxQueuedJobs} jobs queued; submit more once some have started`);
      full.retryAfterSeconds = QUEUE_FULL_RETRY_AFTER_SECONDS;
      throw full;
    });
  if (job) return { job, created: true };

  // The key is taken: by this very request (a retry) or by a different one (a client bug).
  const existing = idempotencyKey ? await jobs.findJobByIdempotencyKey(deps.db, principal.keyId, idempotencyKey) : undefined;
  if (!existing) throw new Error('idempotent insert conflicted but no job holds the key');
  if (existing.request_hash !== newJob.requestHash) {
    throw new AppError('idempotency_conflict', 'this Idempotency-Key was used with a different request body', [
      { path: '/header/idempotency-key', message: `already used for job ${existing.id} with a different body` },
    ]);
  }
  return { job: existing, created: false };
}

const QUEUE_FULL_RETRY_AFTER_SECONDS = 5;

/** Same request, same hash, whichever form `parameters` came in (defaults applied, keys sorted). */
function hashRequest(job: jobs.NewJob): string {
  const sorted = (o: object) => Object.entries(o).sort(([a], [b]) => a.localeCompare(b));
  const canonical = JSON.stringify([job.prompt, sorted(job.parameters), job.priority, job.webhookUrl ?? null, job.webhookEventsFilter ?? null]);
  return createHash('sha256').update(canonical).digest('hex');
}

/** The job, if `principal` may see it; another key's job is a 404 like an unknown one. */
export async function getJob(db: Database, principal: Principal, id: string): Promise<JobRow> {
  const job = await jobs.findScopedJob(db, id, scopeOf(principal));
  if (!job) throw new AppError('not_found', `no job with id ${id}`);
  return job;
}

/** The job as `/status` shows it, with its live queue position while queued. */
export async function getJobStatus(db: Database, principal: Principal, id: string): Promise<JobStatusView> {
  const job = await getJob(db, principal, id);
  return toStatusView(job, { queuePosition: await jobs.queuePosition(db, job) });
}

export interface ListQuery {
  status?: JobState[];
  created_after?: string;
  created_before?: string;
  limit?: number;
  cursor?: string;
}

export async function listJobs(db: Database, principal: Principal, query: ListQuery): Promise<JobList> {
  const limit = query.limit ?? 20;
  const rows = await jobs.listJobs(db, {
    ownerId: principal.operator ? undefined : principal.keyId,
    statuses: query.status,
    createdAfter: query.created_after ? parseInstant(query.created_after, '/query/created_after') : undefined,
    createdBefore: query.created_before ? parseInstant(query.created_before, '/query/created_before') : undefined,
    after: query.cursor ? decodeCursor(query.cursor) : undefined,
    limit: limit + 1,
  });
  const page = rows.slice(0, limit);
  const last = page.at(-1);
  return {
    jobs: page.map((job) => toStatusView(job)),
    ...(rows.length > limit && last ? { next_cursor: encodeCursor(last) } : {}),
  };
}

// A cursor is the (created_at, id) of the last job of a page: stable under inserts, opaque to clients.
function encodeCursor(job: JobRow): string {
  return Buffer.from(JSON.stringify([job.created_at.toISOString(), job.id])).toString('base64url');
}

function decodeCursor(cursor: string): { createdAt: Date; id: string } {
  try {
    const [at, id] = JSON.parse(Buffer.from(cursor, 'base64url').toString('utf8')) as [unknown, unknown];
    if (typeof at !== 'string' || typeof id !== 'string' || !UUID.test(id)) throw new Error('bad cursor');
    return { createdAt: parseInstant(at, '/query/cursor'), id };
  } catch {
    throw new AppError('validation_failed', 'cursor is not one this service issued', [{ path: '/query/cursor', message: 'is not a valid cursor' }]);
  }
}

const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/;
// Years Postgres' timestamptz and JavaScript's Date both hold, and that a client could mean.
const EARLIEST = Date.parse('0001-01-01T00:00:00Z');
const LATEST = Date.parse('9999-12-31T23:59:59.999Z');

/**
 * An instant the contract's format let through but JavaScript or Postgres cannot hold (a leap second
 * `23:59:60`, year −271821) is the client's mistake: a 400 naming the parameter, not a 500.
 */
function parseInstant(text: string, path: string): Date {
  const at = new Date(text);
  const ms = at.getTime();
  if (Number.isNaN(ms) || ms < EARLIEST || ms > LATEST) {
    throw new AppError('validation_failed', `${path.split('/').pop()} is not an instant this service can store`, [
      { path, message: 'must be a date-time between years 0001 and 9999 (no leap seconds)' },
    ]);
  }
  return at;
}

/**
 * Cancels a job: a queued one never starts (its queue entry is cancelled in the same transaction); a
 * running one is marked canceled and its worker, told through the job_events notification, aborts it
 * and cancels the provider's prediction. A finished job is left unchanged: AppError('job_finished').
 */
export async function cancelJob(deps: JobServiceDeps, principal: Principal, id: string): Promise<JobStatusView> {
  const canceled = await deps.db.transaction().execute(async (trx) => {
    const row = await jobs.cancelJob(trx, id, scopeOf(principal));
    if (!row) return undefined;
    await deps.boss.cancel(GENERATE, id, { db: fromKysely(trx) });
    await enqueueWebhook(deps.boss, trx, row, 'completed', deps.webhookConfig);
    return row;
  });
  if (canceled) return toStatusView(canceled);
  const job = await getJob(deps.db, principal, id);
  throw new AppError('job_finished', `the job is already ${job.status}; it was left unchanged`, undefined, { job: toStatusView(job) });
}
