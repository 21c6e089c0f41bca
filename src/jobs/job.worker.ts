// The worker: takes generate jobs from the queue, runs the provider, normalises and stores the images,
// and records every attempt. Handlers are idempotent: a replay rewrites the same files and the final
// status change only applies while the attempt still owns the job.
import { hostname } from 'node:os';
import type { JobResult, JobWithMetadata, PgBoss } from 'pg-boss';
import type { Config } from '../config.ts';
import type { Database } from '../db/database.ts';
import type { Logger } from '../logger.ts';
import { ImageDecodeError, normalizeImage } from '../media/normalize.ts';
import { mediaFileName, type MediaStorage } from '../media/storage.ts';
import { ProviderError, type ImageProvider } from '../providers/provider.ts';
import { GENERATE, GENERATE_DEAD, MAINTENANCE, type QueuePayloads } from '../queue/queue.ts';
import { completeJob, expireIdempotencyKeys, failAbandonedJob, failAttempt, recordPrediction, startAttempt, type Output } from './job.repository.ts';
import type { ResolvedParameters } from './parameters.ts';

export type WorkerConfig = Pick<
  Config,
  'WORKER_CONCURRENCY' | 'WORKER_BATCH_SIZE' | 'WORKER_POLL_INTERVAL_SECONDS' | 'MAX_IMAGE_PIXELS' | 'IDEMPOTENCY_TTL_HOURS'
>;

export interface WorkerDeps {
  db: Database;
  boss: PgBoss;
  provider: ImageProvider;
  storage: MediaStorage;
  config: WorkerConfig;
  logger: Logger;
  /** Recorded on each attempt row, to tell which worker ran it. */
  workerName?: string;
}

type GenerateJob = JobWithMetadata<QueuePayloads['generate']>;

/** Registers the queue handlers; pg-boss runs them until `boss.stop()`. */
export async function startWorker(deps: WorkerDeps): Promise<void> {
  const { config } = deps;
  const workerName = deps.workerName ?? `${hostname()}:${process.pid}`;
  const batchSize = Math.min(config.WORKER_BATCH_SIZE, config.WORKER_CONCURRENCY);
  const polling = {
    // A full batch means more work waits: fetch again at once instead of sleeping (drains backlogs).
    burstWhenBatchFull: true,
    pollingIntervalSeconds: config.WORKER_POLL_INTERVAL_SECONDS,
    // NOTIFY wakes us for new jobs; this poll is what finds retries whose backoff has elapsed.
    notifyPollingIntervalSeconds: config.WORKER_POLL_INTERVAL_SECONDS,
  };
  await deps.boss.work(
    GENERATE,
    {
      ...polling,
      batchSize,
      localConcurrency: Math.ceil(config.WORKER_CONCURRENCY / batchSize),
      includeMetadata: true as const,
      perJobResults: true as const,
    },
    (jobs: GenerateJob[]) => Promise.all(jobs.map((job) => processJob({ ...deps, workerName }, job))),
  );
  await deps.boss.work(
    GENERATE_DEAD,
    { ...polling, batchSize: 50, includeMetadata: true as const, perJobResults: true as const },
    (jobs: JobWithMetadata<QueuePayloads['generate-dead']>[]) => Promise.all(jobs.map((job) => settleDeadJob(deps, job))),
  );
  await deps.boss.schedule(MAINTENANCE, '*/10 * * * *');
  await deps.boss.work(MAINTENANCE, { pollingIntervalSeconds: 30 }, () => runMaintenance(deps));
  deps.logger.info({ provider: deps.provider.name, concurrency: config.WORKER_CONCURRENCY, batchSize }, 'worker started');
}

/** Runs one attempt of one job and tells pg-boss how it ended. Never throws. */
export async function processJob(deps: WorkerDeps & { workerName: string }, job: GenerateJob): Promise<JobResult> {
  const { jobId } = job.data;
  const attempt = job.retryCount + 1;
  const lastAttempt = job.retryCount >= job.retryLimit;
  const log = deps.logger.child({ jobId, attempt });
  const started = performance.now();

  let prediction: { id?: string; timeMs?: number } = {};
  try {
    const row = await deps.db.transaction().execute((trx) => startAttempt(trx, jobId, attempt, deps.workerName));
    if (!row) {
      log.info('job already finished; nothing to do');
      return { id: job.id, status: 'completed' };
    }
    const params = row.parameters as unknown as ResolvedParameters;
    const result = await deps.provider.generate(
      {
        jobId,
        prompt: row.prompt,
        width: params.width,
        height: params.height,
        outputFormat: params.output_format,
        numOutputs: params.num_outputs,
        ...(params.seed === undefined ? {} : { seed: params.seed }),
      },
      job.signal,
      {
        onPrediction: (id) => {
          prediction.id = id;
          recordPrediction(deps.db, jobId, attempt, id).catch((err) => log.warn({ err }, 'could not record the prediction id'));
        },
      },
    );
    prediction = { id: result.predictionId ?? prediction.id, timeMs: result.predictTimeMs };
    if (result.images.length === 0) throw new ProviderError('retryable', 'the provider returned no images');

    const outputs: Output[] = [];
    for (const [index, image] of result.images.entries()) {
      job.signal.throwIfAborted();
      const normalized = await normalizeImage(image.data, {
        width: params.width,
        height: params.height,
        format: params.output_format,
        maxPixels: deps.config.MAX_IMAGE_PIXELS,
      }).catch((err: unknown) => {
        throw err instanceof ImageDecodeError
          ? new ProviderError('retryable', `output ${index + 1} of the provider is ${err.message}`, { cause: err })
          : err;
      });
      const file = mediaFileName(jobId, index, params.output_format);
      await deps.storage.write(file, normalized.data);
      outputs.push({ url: `/media/${file}`, width: normalized.width, height: normalized.height, format: normalized.format, bytes: normalized.bytes });
    }

    const won = await completeJob(deps.db, jobId, attempt, outputs, { predictionId: prediction.id, predictTimeMs: prediction.timeMs });
    log.info({ outputs: outputs.length, ms: Math.round(performance.now() - started), stale: !won }, 'job completed');
    return { id: job.id, status: 'completed' };
  } catch (err) {
    return await failJob(deps, job, err, { attempt, lastAttempt, prediction, log });
  }
}

async function failJob(
  deps: WorkerDeps,
  job: GenerateJob,
  err: unknown,
  ctx: { attempt: number; lastAttempt: boolean; prediction: { id?: string; timeMs?: number }; log: Logger },
): Promise<JobResult> {
  const { jobId } = job.data;
  const aborted = job.signal.aborted;
  const permanent = err instanceof ProviderError && err.kind === 'permanent';
  const kind = aborted ? 'aborted' : err instanceof ProviderError ? err.kind : 'internal';
  const final = permanent || ctx.lastAttempt;
  const message = aborted
    ? `the attempt was stopped (job timeout or worker shutdown)${final ? '' : '; it will be retried'}`
    : err instanceof ProviderError
      ? err.message
      : `internal error: ${(err as Error)?.message ?? String(err)}`;
  const error = final && !permanent && ctx.attempt > 1 ? `gave up after ${ctx.attempt} attempts: ${message}` : message;
  const level = permanent || kind === 'internal' ? 'error' : 'warn';
  ctx.log[level]({ err, kind, final }, 'attempt failed');
  try {
    await failAttempt(deps.db, jobId, ctx.attempt, {
      error,
      kind,
      final,
      predictionId: err instanceof ProviderError ? (err.predictionId ?? ctx.prediction.id) : ctx.prediction.id,
      predictTimeMs: err instanceof ProviderError ? err.predictTimeMs : undefined,
    });
  } catch (dbErr) {
    // Our record could not be written (database gone?): let the queue retry the whole attempt.
    ctx.log.error({ err: dbErr }, 'could not record the failed attempt');
    return { id: job.id, status: 'failed', output: { error: message } };
  }
  // A permanent failure goes to the dead-letter queue at once, skipping the retries it would waste.
  return { id: job.id, status: permanent ? 'deadletter' : 'failed', output: { error, kind } };
}

/** Housekeeping every 10 minutes: forget idempotency keys past their retention. */
export async function runMaintenance(deps: Pick<WorkerDeps, 'db' | 'config' | 'logger'>): Promise<void> {
  const forgotten = await expireIdempotencyKeys(deps.db, deps.config.IDEMPOTENCY_TTL_HOURS);
  if (forgotten > 0) deps.logger.info({ forgotten }, 'idempotency keys expired');
}

/** A job the queue gave up on: make sure our row says failed (a no-op when the handler already said so). */
async function settleDeadJob(deps: WorkerDeps, job: JobWithMetadata<QueuePayloads['generate-dead']>): Promise<JobResult> {
  const attempts = (job.sourceRetryCount ?? 0) + 1;
  const changed = await failAbandonedJob(deps.db, job.data.jobId, `gave up after ${attempts} attempts: the worker stopped or timed out on the last one`);
  if (changed) deps.logger.warn({ jobId: job.data.jobId }, 'job failed after the queue gave up on it');
  return { id: job.id, status: 'completed' };
}
