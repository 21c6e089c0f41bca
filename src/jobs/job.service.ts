// Job use cases: submit (row + queue entry in one transaction) and the public view of a job.
import { createHash, randomUUID } from 'node:crypto';
import type { PgBoss } from 'pg-boss';
import type { Database } from '../db/database.ts';
import { AppError } from '../errors.ts';
import type { components } from '../http/api-types.ts';
import { enqueueGenerate, type QueueConfig } from '../queue/queue.ts';
import { findJob, findJobByIdempotencyKey, insertJob, type JobRow, type Output } from './job.repository.ts';
import { resolveParameters, type GenerationParameters, type ResolvedParameters } from './parameters.ts';

export type JobStatusView = components['schemas']['JobStatus'];
export type GenerateRequest = components['schemas']['GenerateRequest'];

export interface JobServiceDeps {
  db: Database;
  boss: PgBoss;
  queueConfig: QueueConfig;
  /** Name of the provider new jobs will run on. */
  provider: string;
}

export interface Submission {
  job: JobRow;
  /** False when an Idempotency-Key repeat returned an existing job. */
  created: boolean;
}

export async function submitJob(deps: JobServiceDeps, request: GenerateRequest, idempotencyKey?: string): Promise<Submission> {
  const parameters = resolveParameters(request.parameters as GenerationParameters | string | undefined);
  const prompt = request.prompt;
  const requestHash = idempotencyKey ? hashRequest(prompt, parameters) : undefined;

  const job = await deps.db.transaction().execute(async (trx) => {
    const row = await insertJob(trx, { id: randomUUID(), prompt, parameters, provider: deps.provider, idempotencyKey, requestHash });
    if (row) await enqueueGenerate(deps.boss, trx, row.id, deps.queueConfig);
    return row;
  });
  if (job) return { job, created: true };

  // The key is taken: by this very request (a retry) or by a different one (a client bug).
  const existing = idempotencyKey ? await findJobByIdempotencyKey(deps.db, idempotencyKey) : undefined;
  if (!existing) throw new Error('idempotent insert conflicted but no job holds the key');
  if (existing.request_hash !== requestHash) {
    throw new AppError('idempotency_conflict', 'this Idempotency-Key was used with a different request body', [
      { path: '/header/idempotency-key', message: `already used for job ${existing.id} with a different body` },
    ]);
  }
  return { job: existing, created: false };
}

/** Same prompt and same resolved parameters hash the same, whichever form parameters came in. */
function hashRequest(prompt: string, parameters: ResolvedParameters): string {
  const canonical = JSON.stringify([prompt, Object.entries(parameters).sort(([a], [b]) => a.localeCompare(b))]);
  return createHash('sha256').update(canonical).digest('hex');
}

export async function getJobStatus(db: Database, id: string): Promise<JobStatusView> {
  const job = await findJob(db, id);
  if (!job) throw new AppError('not_found', `no job with id ${id}`);
  return toStatusView(job);
}

/** The public shape: the original's fields first (`job_id`, `status`, `result_url` | `error`), then ours. */
export function toStatusView(job: JobRow): JobStatusView {
  const outputs = job.outputs as unknown as Output[];
  return {
    job_id: job.id,
    status: job.status as JobStatusView['status'],
    ...(job.status === 'completed' && outputs.length > 0 ? { result_url: outputs[0].url } : {}),
    ...(job.status === 'failed' ? { error: job.error ?? 'failed' } : {}),
    prompt: job.prompt,
    parameters: job.parameters as unknown as ResolvedParameters,
    attempts: job.attempts,
    ...(job.last_error && job.status !== 'failed' && job.status !== 'completed' ? { last_error: job.last_error } : {}),
    outputs,
    provider: job.provider,
    ...(job.prediction_id ? { prediction_id: job.prediction_id } : {}),
    created_at: job.created_at.toISOString(),
    updated_at: job.updated_at.toISOString(),
    ...(job.started_at ? { started_at: job.started_at.toISOString() } : {}),
    ...(job.finished_at ? { finished_at: job.finished_at.toISOString() } : {}),
  };
}
