// The worker: takes generate jobs from the queue, runs the provider, normalises and stores the images
// (plus thumbnails), and records every attempt. Handlers are idempotent: a replay rewrites the same
// files and the final status change only applies while the attempt still owns the job.
import { hostname } from 'node:os';
import type { JobResult, JobWithMetadata, PgBoss } from 'pg-boss';
import type { Config } from '../config.ts';
import type { Database, Tx } from '../db/database.ts';
import type { Logger } from '../logger.ts';
import { ImageDecodeError, makeThumbnail, normalizeImage } from '../media/normalize.ts';
import { mediaFileName, thumbnailFileName, type MediaStorage } from '../media/storage.ts';
import type { Metrics } from '../metrics.ts';
import { ProviderError, type ImageProvider } from '../providers/provider.ts';
import { GENERATE, GENERATE_DEAD, MAINTENANCE, WEBHOOK, type QueuePayloads } from '../queue/queue.ts';
import { deliverWebhook, enqueueWebhook, type WebhookConfig, type WebhookEvent } from '../webhooks/webhook.service.ts';
import type { JobEventHub } from './job.events.ts';
import * as jobs from './job.repository.ts';
import type { JobRow, Output } from './job.repository.ts';
import type { ResolvedParameters } from './parameters.ts';

export type WorkerConfig = Pick<
  Config,
  'WORKER_CONCURRENCY' | 'WORKER_BATCH_SIZE' | 'WORKER_POLL_INTERVAL_SECONDS' | 'MAX_IMAGE_PIXELS' | 'IDEMPOTENCY_TTL_HOURS' | 'MAX_IMAGE_BYTES'
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
  /** Recorded on each attempt row, to tell which worker ran it. */
  workerName: string;
}

type GenerateJob = JobWithMetadata<QueuePayloads['generate']>;

class JobCanceled extends Error {}

/** Progress is written at most this often per job. */
const PROGRESS_INTERVAL_MS = 1000;

/** Registers the queue handlers; pg-boss runs them until `boss.stop()`. Returns an unsubscribe. */
export async function startWorker(input: Omit<WorkerDeps, 'workerName'> & { workerName?: string }): Promise<() => void> {
  const deps: WorkerDeps = { ...input, workerName: input.workerName ?? `${hostname()}:${process.pid}` };
  const { config } = deps;
  const batchSize = Math.min(config.WORKER_BATCH_SIZE, config.WORKER_CONCURRENCY);
  const polling = {
    // A full batch means more work waits: fetch again at once instead of sleeping (drains backlogs).
    burstWhenBatchFull: true,
    pollingIntervalSeconds: config.WORKER_POLL_INTERVAL_SECONDS,
    // NOTIFY wakes us for new jobs; this poll is what finds retries whose backoff has elapsed.
    notifyPollingIntervalSeconds: config.WORKER_POLL_INTERVAL_SECONDS,
  };

  // Completions of concurrently running jobs are committed together: one transaction per flush.
  const complete = groupCommit<jobs.Completion, JobRow | undefined>(async (items) => {
    const rows = await deps.db.transaction().execute(async (trx) => {
      const done = await jobs.completeJobs(trx, items);
      for (const row of done) await enqueueWebhook(deps.boss, trx, row, 'completed', deps.config);
      return done;
    });
    const byId = new Map(rows.map((r) => [r.id, r]));
    return items.map((item) => byId.get(item.jobId));
  });

  // Cancellation of a running job arrives as a job_events notification.
  const running = new Map<string, AbortController>();
  const cancel = (jobId: string) => running.get(jobId)?.abort(new JobCanceled('the job was canceled'));
  const offCancel = deps.events.onAny((n) => {
    if (n.status === 'canceled') cancel(n.job_id);
  });
  const offResync = deps.events.onResync(() => {
    // Notifications may have been missed while the listener reconnected: ask the table.
    const ids = [...running.keys()];
    if (ids.length === 0) return;
    void deps.db
      .selectFrom('jobs')
      .select('id')
      .where('id', 'in', ids)
      .where('status', '=', 'canceled')
      .execute()
      .then((rows) => rows.forEach((r) => cancel(r.id)))
      .catch((err) => deps.logger.warn({ err }, 'could not check for cancellations'));
  });

  await deps.boss.work(
    GENERATE,
    {
      ...polling,
      batchSize,
      localConcurrency: Math.ceil(config.WORKER_CONCURRENCY / batchSize),
      includeMetadata: true as const,
      perJobResults: true as const,
    },
    async (batch: GenerateJob[]) => {
      const started = await startBatch(deps, batch);
      return Promise.all(batch.map((job) => processJob(deps, job, running, started, complete)));
    },
  );
  await deps.boss.work(
    GENERATE_DEAD,
    { ...polling, batchSize: 50, includeMetadata: true as const, perJobResults: true as const },
    (batch: JobWithMetadata<QueuePayloads['generate-dead']>[]) => Promise.all(batch.map((job) => settleDeadJob(deps, job))),
  );
  await deps.boss.work(
    WEBHOOK,
    { ...polling, batchSize: 10, includeMetadata: true as const, perJobResults: true as const },
    (batch: JobWithMetadata<QueuePayloads['webhook']>[]) => Promise.all(batch.map((job) => deliverWebhookJob(deps, job))),
  );
  await deps.boss.schedule(MAINTENANCE, '*/10 * * * *');
  await deps.boss.work(MAINTENANCE, { pollingIntervalSeconds: 30 }, () => runMaintenance(deps));
  deps.logger.info({ provider: deps.provider.name, concurrency: config.WORKER_CONCURRENCY, batchSize }, 'worker started');
  return () => {
    offCancel();
    offResync();
  };
}

/**
 * Starts the attempts of a fetched batch in one transaction (and queues `start` webhooks). Returns the
 * started rows by job id, or the error that prevented starting them (the database is down?).
 */
async function startBatch(deps: WorkerDeps, batch: GenerateJob[]): Promise<Map<string, JobRow> | Error> {
  try {
    return await deps.db.transaction().execute(async (trx) => {
      const rows = await jobs.startAttempts(trx, batch.map((job) => ({ jobId: job.data.jobId, number: job.retryCount + 1 })), deps.workerName);
      for (const row of rows) if (row.attempts === 1) await enqueueWebhook(deps.boss, trx, row, 'start', deps.config);
      return new Map(rows.map((r) => [r.id, r]));
    });
  } catch (err) {
    return err as Error;
  }
}

/**
 * Group commit: calls made while a flush runs are queued and flushed together when it ends, so under
 * load many jobs share one transaction, and at idle a call is flushed at once.
 */
export function groupCommit<T, R>(flush: (items: T[]) => Promise<R[]>): (item: T) => Promise<R> {
  let queue: { item: T; resolve: (r: R) => void; reject: (e: unknown) => void }[] = [];
  let flushing = false;
  const run = async () => {
    if (flushing || queue.length === 0) return;
    flushing = true;
    const taken = queue;
    queue = [];
    try {
      const results = await flush(taken.map((q) => q.item));
      taken.forEach((q, i) => q.resolve(results[i]));
    } catch (err) {
      taken.forEach((q) => q.reject(err));
    } finally {
      flushing = false;
      void run();
    }
  };
  return (item) =>
    new Promise<R>((resolve, reject) => {
      queue.push({ item, resolve, reject });
      void run();
    });
}

/** Runs `change` in a transaction and, when it changed the job, queues the webhook of `event`. */
async function transition(deps: WorkerDeps, event: WebhookEvent | undefined, change: (trx: Tx) => Promise<JobRow | undefined>): Promise<JobRow | undefined> {
  return deps.db.transaction().execute(async (trx) => {
    const row = await change(trx);
    if (row && event) await enqueueWebhook(deps.boss, trx, row, event, deps.config);
    return row;
  });
}

/** Runs one attempt of one job and tells pg-boss how it ended. Never throws. */
export async function processJob(
  deps: WorkerDeps,
  job: GenerateJob,
  running: Map<string, AbortController>,
  started: Map<string, JobRow> | Error,
  complete: (c: jobs.Completion) => Promise<JobRow | undefined>,
): Promise<JobResult> {
  const { jobId } = job.data;
  const attempt = job.retryCount + 1;
  const lastAttempt = job.retryCount >= job.retryLimit;
  const log = deps.logger.child({ jobId, attempt });
  const canceler = new AbortController();
  const signal = AbortSignal.any([job.signal, canceler.signal]);
  running.set(jobId, canceler);
  const prediction: { id?: string; timeMs?: number } = {};
  let providerStarted: number | undefined;

  try {
    if (started instanceof Error) throw started;
    const row = started.get(jobId);
    if (!row) {
      log.info('job already finished or canceled; nothing to do');
      return { id: job.id, status: 'completed' };
    }
    if (attempt === 1 && row.started_at) deps.metrics.pickupSeconds.observe((row.started_at.getTime() - row.created_at.getTime()) / 1000);
    if (attempt > 1) deps.metrics.retries.inc();
    const params = row.parameters as unknown as ResolvedParameters;

    providerStarted = performance.now();
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
      signal,
      {
        onPrediction: (id) => {
          prediction.id = id;
          jobs.recordPrediction(deps.db, jobId, attempt, id).catch((err) => log.warn({ err }, 'could not record the prediction id'));
        },
        onProgress: progressRecorder(deps, row, attempt, log),
      },
    );
    deps.metrics.providerSeconds.observe({ provider: deps.provider.name, outcome: 'succeeded' }, (performance.now() - providerStarted) / 1000);
    prediction.id = result.predictionId ?? prediction.id;
    prediction.timeMs = result.predictTimeMs;
    if (result.images.length === 0) throw new ProviderError('retryable', 'the provider returned no images');

    const outputs: Output[] = [];
    for (const [index, image] of result.images.entries()) {
      signal.throwIfAborted();
      outputs.push(await storeOutput(deps, jobId, index, image.data, params));
    }

    const done = await complete({ jobId, number: attempt, outputs, predictionId: prediction.id, predictTimeMs: prediction.timeMs });
    if (done) {
      deps.metrics.jobsFinished.inc({ status: 'completed' });
      if (done.started_at && done.finished_at) deps.metrics.jobSeconds.observe({ status: 'completed' }, (done.finished_at.getTime() - done.started_at.getTime()) / 1000);
    }
    log.info({ outputs: outputs.length, stale: !done }, done ? 'job completed' : 'job finished elsewhere meanwhile (canceled?); outputs discarded');
    return { id: job.id, status: 'completed' };
  } catch (err) {
    if (providerStarted !== undefined && prediction.timeMs === undefined) {
      deps.metrics.providerSeconds.observe({ provider: deps.provider.name, outcome: 'failed' }, (performance.now() - providerStarted) / 1000);
    }
    if (canceler.signal.aborted) {
      log.info('attempt stopped: the job was canceled');
      await jobs
        .cancelAttempt(deps.db, jobId, attempt, { predictionId: prediction.id })
        .catch((dbErr) => log.warn({ err: dbErr }, 'could not record the canceled attempt'));
      return { id: job.id, status: 'completed' };
    }
    return await failJob(deps, job, err, { attempt, lastAttempt, prediction, log });
  } finally {
    running.delete(jobId);
  }
}

/** Normalises output `index`, writes it and its thumbnail, and describes it. */
async function storeOutput(deps: WorkerDeps, jobId: string, index: number, data: Buffer, params: ResolvedParameters): Promise<Output> {
  if (data.length > deps.config.MAX_IMAGE_BYTES) {
    throw new ProviderError('retryable', `output ${index + 1} of the provider is ${data.length} bytes, over the ${deps.config.MAX_IMAGE_BYTES}-byte limit`);
  }
  const normalized = await normalizeImage(data, {
    width: params.width,
    height: params.height,
    format: params.output_format,
    maxPixels: deps.config.MAX_IMAGE_PIXELS,
  }).catch((err: unknown) => {
    throw err instanceof ImageDecodeError ? new ProviderError('retryable', `output ${index + 1} of the provider is ${err.message}`, { cause: err }) : err;
  });
  const file = mediaFileName(jobId, index, params.output_format);
  const thumb = thumbnailFileName(jobId, index);
  await deps.storage.write(thumb, await makeThumbnail(normalized.data));
  await deps.storage.write(file, normalized.data);
  return { url: `/media/${file}`, width: normalized.width, height: normalized.height, format: normalized.format, bytes: normalized.bytes, thumbnail_url: `/media/${thumb}` };
}

/**
 * Records provider progress: at most one write in flight and at most one a second per job (the latest
 * value wins), so a chatty provider cannot flood the database. Completion itself ends progress.
 */
function progressRecorder(deps: WorkerDeps, job: JobRow, attempt: number, log: Logger): (fraction: number) => void {
  const jobId = job.id;
  // One statement, unless a webhook wants progress events (then the delivery commits with it).
  const wantsWebhook = job.webhook_url !== null && (job.webhook_events_filter ?? []).includes('progress');
  const write = (value: number) =>
    wantsWebhook ? transition(deps, 'progress', (trx) => jobs.setProgress(trx, jobId, attempt, value)) : jobs.setProgress(deps.db, jobId, attempt, value);
  let pending: number | undefined;
  let writing = false;
  let lastWrite = 0;
  const flush = async (): Promise<void> => {
    if (writing || pending === undefined) return;
    const wait = lastWrite + PROGRESS_INTERVAL_MS - Date.now();
    if (wait > 0) {
      writing = true;
      setTimeout(() => {
        writing = false;
        void flush();
      }, wait).unref();
      return;
    }
    const value = pending;
    pending = undefined;
    writing = true;
    lastWrite = Date.now();
    try {
      await write(value);
    } catch (err) {
      log.warn({ err }, 'could not record progress');
    } finally {
      writing = false;
    }
    void flush();
  };
  return (fraction) => {
    const value = Math.max(0, Math.min(1, fraction));
    if (value >= 1) return;
    pending = value;
    void flush();
  };
}

async function failJob(
  deps: WorkerDeps,
  job: GenerateJob,
  err: unknown,
  ctx: { attempt: number; lastAttempt: boolean; prediction: { id?: string; timeMs?: number }; log: Logger },
): Promise<JobResult> {
  const { jobId } = job.data;
  const aborted = job.signal.aborted;
  const permanent = !aborted && err instanceof ProviderError && err.kind === 'permanent';
  const kind = aborted ? 'aborted' : err instanceof ProviderError ? err.kind : 'internal';
  const final = permanent || ctx.lastAttempt;
  const message = aborted
    ? `the attempt was stopped (job timeout or worker shutdown)${final ? '' : '; it will be retried'}`
    : err instanceof ProviderError
      ? err.message
      : `internal error: ${(err as Error)?.message ?? String(err)}`;
  const error = final && !permanent && ctx.attempt > 1 ? `gave up after ${ctx.attempt} attempts: ${message}` : message;
  ctx.log[permanent || kind === 'internal' ? 'error' : 'warn']({ err, kind, final }, 'attempt failed');
  deps.metrics.providerErrors.inc({ provider: deps.provider.name, kind });
  try {
    const row = await transition(deps, final ? 'completed' : undefined, (trx) =>
      jobs.failAttempt(trx, jobId, ctx.attempt, {
        error,
        kind,
        final,
        predictionId: err instanceof ProviderError ? (err.predictionId ?? ctx.prediction.id) : ctx.prediction.id,
        predictTimeMs: err instanceof ProviderError ? err.predictTimeMs : undefined,
      }),
    );
    if (row && final) deps.metrics.jobsFinished.inc({ status: 'failed' });
  } catch (dbErr) {
    // Our record could not be written (database gone?): let the queue retry the whole attempt.
    ctx.log.error({ err: dbErr }, 'could not record the failed attempt');
    return { id: job.id, status: 'failed', output: { error: message } };
  }
  // A permanent failure goes to the dead-letter queue at once, skipping the retries it would waste.
  return { id: job.id, status: permanent ? 'deadletter' : 'failed', output: { error, kind } };
}

/** One try of a webhook delivery; a failed try is retried by the queue with backoff. */
async function deliverWebhookJob(deps: WorkerDeps, job: JobWithMetadata<QueuePayloads['webhook']>): Promise<JobResult> {
  try {
    await deliverWebhook(deps, job.data.deliveryId, job.retryCount >= job.retryLimit);
    deps.metrics.webhookDeliveries.inc({ outcome: 'delivered' });
    return { id: job.id, status: 'completed' };
  } catch (err) {
    deps.metrics.webhookDeliveries.inc({ outcome: 'failed' });
    return { id: job.id, status: 'failed', output: { error: (err as Error).message } };
  }
}

/** Housekeeping every 10 minutes: forget idempotency keys past their retention. */
export async function runMaintenance(deps: Pick<WorkerDeps, 'db' | 'config' | 'logger'>): Promise<void> {
  const forgotten = await jobs.expireIdempotencyKeys(deps.db, deps.config.IDEMPOTENCY_TTL_HOURS);
  if (forgotten > 0) deps.logger.info({ forgotten }, 'idempotency keys expired');
}

/** A job the queue gave up on: make sure our row says failed (a no-op when the handler already said so). */
async function settleDeadJob(deps: WorkerDeps, job: JobWithMetadata<QueuePayloads['generate-dead']>): Promise<JobResult> {
  const attempts = (job.sourceRetryCount ?? 0) + 1;
  const reason = `gave up after ${attempts} attempts: the worker stopped or timed out on the last one`;
  const changed = await transition(deps, 'completed', (trx) => jobs.failAbandonedJob(trx, job.data.jobId, reason));
  if (changed) {
    deps.metrics.jobsFinished.inc({ status: 'failed' });
    deps.logger.warn({ jobId: job.data.jobId }, 'job failed after the queue gave up on it');
  }
  return { id: job.id, status: 'completed' };
}
