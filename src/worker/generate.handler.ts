// One attempt of one generate job: start it, run the provider, normalise and store the images (plus
// thumbnails) under names scoped to the attempt, and settle it. Our row and pg-boss's job change in the
// same transaction, each fenced to this attempt, so a stale worker (its claim lost) can change neither,
// and its files are removed. Writes of concurrent jobs are group-committed; failures are not shared.
import { availableParallelism } from 'node:os';
import { fromKysely, type PgBoss } from 'pg-boss';
import type { Config } from '../config.ts';
import type { Database, Tx } from '../db/database.ts';
import { isTransientDatabaseError } from '../errors.ts';
import * as jobs from '../jobs/job.repository.ts';
import type { JobRow, Output } from '../jobs/job.repository.ts';
import type { ResolvedParameters } from '../jobs/parameters.ts';
import type { Logger } from '../logger.ts';
import { ImageDecodeError, makeThumbnail, normalizeImage } from '../media/normalize.ts';
import { mediaFileName, newAttemptToken, thumbnailFileName, type MediaStorage } from '../media/storage.ts';
import type { Metrics } from '../metrics.ts';
import { ProviderError, type ImageProvider } from '../providers/provider.ts';
import { GENERATE } from '../queue/queue.ts';
import { enqueueWebhook, type WebhookConfig, type WebhookEvent } from '../webhooks/webhook.service.ts';
import { groupCommit } from './group-commit.ts';
import { createSemaphore, type Semaphore } from './semaphore.ts';
import { JobStopped, type SlotJob } from './slots.ts';

export interface GenerateDeps {
  db: Database;
  boss: PgBoss;
  provider: ImageProvider;
  storage: MediaStorage;
  config: Pick<Config, 'MAX_IMAGE_PIXELS' | 'MAX_IMAGE_BYTES' | 'IMAGE_CONCURRENCY'> & WebhookConfig;
  logger: Logger;
  metrics: Metrics;
  /** Recorded on each attempt row, to tell which worker ran it. */
  workerName: string;
  /** Aborted when the worker stops for good: database writes still being retried give up then. */
  giveUp: AbortSignal;
}

/** Progress is written at most this often per job. */
const PROGRESS_INTERVAL_MS = 1000;

/** How an attempt ended, as the settlement writes it. */
type Settlement =
  | { kind: 'completed'; completion: jobs.Completion }
  | { kind: 'failed'; number: number; failure: jobs.AttemptFailure; permanent: boolean }
  | { kind: 'canceled'; number: number; report: jobs.AttemptReport }
  /** The job had already finished or been canceled when the attempt began: nothing to do. */
  | { kind: 'skipped' };

interface SettleItem {
  jobId: string;
  /** pg-boss's attempt fence: the job's retryCount when it was fetched. */
  retryCount: number;
  settlement: Settlement;
}

export function createGenerateHandler(deps: GenerateDeps): (job: SlotJob<'generate'>, signal: AbortSignal) => Promise<void> {
  const retryable = { isTransient: isTransientDatabaseError };
  // Generations that end together must not all decode at once: memory grows with every image in work.
  const imageWork = createSemaphore(deps.config.IMAGE_CONCURRENCY || 4 * availableParallelism());

  // Attempt starts of jobs fetched together commit together (and queue their `start` webhooks).
  const start = groupCommit<jobs.AttemptStart, JobRow | undefined>(async (items) => {
    const rows = await deps.db.transaction().execute(async (trx) => {
      const started = await jobs.startAttempts(trx, items, deps.workerName);
      for (const row of started) if (row.attempts === 1) await enqueueWebhook(deps.boss, trx, row, 'start', deps.config);
      return started;
    });
    const byId = new Map(rows.map((r) => [r.id, r]));
    return items.map((item) => byId.get(item.jobId));
  }, retryable);

  // Settlements commit together: our rows, their webhooks and pg-boss's jobs in one transaction.
  const settle = groupCommit<SettleItem, JobRow | undefined>((items) => deps.db.transaction().execute((trx) => settleAll(deps, trx, items)), retryable);

  return async (job, signal) => {
    const { jobId } = job.data;
    const attempt = job.retryCount + 1;
    const log = deps.logger.child({ jobId, attempt });
    const fence = { jobId, retryCount: job.retryCount };
    const prediction: { id?: string; timeMs?: number } = {};
    const written: string[] = [];
    let providerStarted: number | undefined;
    let outcome: Settlement;
    let progress: ProgressRecorder | undefined;

    try {
      const row = await start({ jobId, number: attempt }, signal);
      if (!row) {
        log.info('job already finished or canceled; nothing to do');
        await settle({ ...fence, settlement: { kind: 'skipped' } }, deps.giveUp);
        return;
      }
      if (attempt === 1 && row.started_at) deps.metrics.pickupSeconds.observe((row.started_at.getTime() - row.created_at.getTime()) / 1000);
      if (attempt > 1) deps.metrics.retries.inc();
      const params = row.parameters as unknown as ResolvedParameters;

      progress = progressRecorder(deps, row, attempt, log);
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
            jobs.recordPrediction(deps.db, jobId, attempt, id).catch((err: unknown) => log.warn({ err }, 'could not record the prediction id'));
          },
          onProgress: progress.record,
        },
      );
      deps.metrics.providerSeconds.observe({ provider: deps.provider.name, outcome: 'succeeded' }, (performance.now() - providerStarted) / 1000);
      prediction.id = result.predictionId ?? prediction.id;
      prediction.timeMs = result.predictTimeMs;
      if (result.images.length === 0) throw new ProviderError('retryable', 'the provider returned no images');

      const token = newAttemptToken();
      const outputs: Output[] = [];
      for (const [index, image] of result.images.entries()) {
        signal.throwIfAborted();
        outputs.push(await storeOutput(deps, imageWork, { jobId, attempt, token, index }, image.data, params, written));
      }
      signal.throwIfAborted();
      outcome = { kind: 'completed', completion: { jobId, number: attempt, outputs, predictionId: prediction.id, predictTimeMs: prediction.timeMs } };
    } catch (err) {
      if (providerStarted !== undefined && prediction.timeMs === undefined) {
        deps.metrics.providerSeconds.observe({ provider: deps.provider.name, outcome: 'failed' }, (performance.now() - providerStarted) / 1000);
      }
      outcome = failureOf(deps, err, signal, job, prediction, log);
    }

    progress?.stop(); // the attempt is over: a progress write still waiting would only be wasted
    let won = false;
    try {
      // Settled even when the job's signal is aborted (canceled, claim lost): the writes are fenced to
      // the attempt. A failed write is retried until it lands or the worker gives up on stopping.
      const row = await settle({ ...fence, settlement: outcome }, deps.giveUp);
      won = outcome.kind === 'completed' && row?.status === 'completed';
      report(deps, outcome, row, log);
    } catch (err) {
      log.error({ err }, 'could not record how the attempt ended; the queue will retry the job after its expiry');
    } finally {
      // Files of an attempt that did not complete the job (failed, canceled, stale) are never served.
      if (!won && written.length > 0) await deps.storage.remove(written).catch((err: unknown) => log.warn({ err }, "could not remove the attempt's files"));
    }
  };
}

/** What a thrown error or an aborted signal means for the attempt. */
function failureOf(
  deps: GenerateDeps,
  err: unknown,
  signal: AbortSignal,
  job: SlotJob<'generate'>,
  prediction: { id?: string; timeMs?: number },
  log: Logger,
): Settlement {
  const attempt = job.retryCount + 1;
  const stopped = signal.aborted && signal.reason instanceof JobStopped ? signal.reason : undefined;
  const report = {
    predictionId: err instanceof ProviderError ? (err.predictionId ?? prediction.id) : prediction.id,
    predictTimeMs: err instanceof ProviderError ? err.predictTimeMs : undefined,
  };
  if (stopped?.why === 'canceled') {
    log.info('attempt stopped: the job was canceled');
    return { kind: 'canceled', number: attempt, report };
  }
  const lastAttempt = job.retryCount >= job.retryLimit;
  const permanent = !stopped && err instanceof ProviderError && err.kind === 'permanent';
  const kind = stopped ? 'aborted' : err instanceof ProviderError ? err.kind : 'internal';
  const final = permanent || lastAttempt;
  const message = stopped
    ? `${stopped.message}${final ? '' : '; it will be retried'}`
    : err instanceof ProviderError
      ? err.message
      : `internal error: ${(err as Error | undefined)?.message ?? String(err)}`;
  const error = final && !permanent && attempt > 1 ? `gave up after ${attempt} attempts: ${message}` : message;
  log[permanent || kind === 'internal' ? 'error' : 'warn']({ err: stopped ? undefined : err, kind, final }, 'attempt failed');
  deps.metrics.providerErrors.inc({ provider: deps.provider.name, kind });
  return { kind: 'failed', number: attempt, permanent, failure: { error, kind, final, ...report } };
}

function report(deps: GenerateDeps, outcome: Settlement, row: JobRow | undefined, log: Logger) {
  if (outcome.kind === 'completed') {
    if (row?.status === 'completed') {
      deps.metrics.jobsFinished.inc({ status: 'completed' });
      if (row.started_at && row.finished_at)
        deps.metrics.jobSeconds.observe({ status: 'completed' }, (row.finished_at.getTime() - row.started_at.getTime()) / 1000);
      log.info({ outputs: outcome.completion.outputs.length }, 'job completed');
    } else {
      log.info('job finished elsewhere meanwhile (canceled, or another attempt owns it); outputs discarded');
    }
  } else if (outcome.kind === 'failed' && row?.status === 'failed') {
    deps.metrics.jobsFinished.inc({ status: 'failed' });
  }
}

/**
 * Writes settlements of any number of attempts in one transaction: completions set-based, failures and
 * cancellations one by one; then pg-boss's jobs, fenced to each attempt. A completed, canceled,
 * permanently failed or skipped attempt completes its queue job (nothing is left to retry); any other
 * failure fails it, so pg-boss retries it with backoff (or dead-letters it after the last try: the
 * dead-letter handler then finds the row already failed).
 */
async function settleAll(deps: GenerateDeps, trx: Tx, items: SettleItem[]): Promise<(JobRow | undefined)[]> {
  const rows = new Map<SettleItem, JobRow | undefined>();
  const completions = items.filter((i) => i.settlement.kind === 'completed');
  if (completions.length > 0) {
    const done = await jobs.completeJobs(
      trx,
      completions.map((i) => (i.settlement as Extract<Settlement, { kind: 'completed' }>).completion),
    );
    const byId = new Map(done.map((r) => [r.id, r]));
    for (const item of completions) rows.set(item, byId.get(item.jobId));
  }
  const retry: SettleItem[] = [];
  const refused: { item: SettleItem; error: string }[] = [];
  for (const item of items) {
    const s = item.settlement;
    if (s.kind === 'failed') {
      rows.set(item, await jobs.failAttempt(trx, item.jobId, s.number, s.failure));
      if (s.permanent) refused.push({ item, error: s.failure.error });
      else retry.push(item);
    } else if (s.kind === 'canceled') {
      await jobs.cancelAttempt(trx, item.jobId, s.number, s.report);
    }
  }
  for (const item of items) {
    const row = rows.get(item);
    const event: WebhookEvent | undefined =
      item.settlement.kind === 'completed' || (item.settlement.kind === 'failed' && item.settlement.failure.final) ? 'completed' : undefined;
    if (row && event) await enqueueWebhook(deps.boss, trx, row, event, deps.config);
  }
  const db = fromKysely(trx);
  const attempts = (list: SettleItem[]) => list.map((i) => ({ id: i.jobId, retryCount: i.retryCount }));
  const finished = items.filter((i) => i.settlement.kind !== 'failed');
  if (finished.length > 0) await deps.boss.complete(GENERATE, attempts(finished), null, { db });
  if (retry.length > 0) await deps.boss.fail(GENERATE, attempts(retry), null, { db });
  // pg-boss has no public terminal fail: a permanent failure completes the queue job (nothing is left to
  // retry), its output saying how the job ended (`jobs.status` is the record).
  for (const { item, error } of refused) {
    await deps.boss.complete(GENERATE, attempts([item]), { outcome: 'failed', kind: 'permanent', error }, { db });
  }
  return items.map((i) => rows.get(i));
}

interface OutputName {
  jobId: string;
  attempt: number;
  token: string;
  index: number;
}

/** Normalises an output, writes it and its thumbnail (recording both in `written`), and describes it. */
async function storeOutput(
  deps: GenerateDeps,
  imageWork: Semaphore,
  name: OutputName,
  data: Buffer,
  params: ResolvedParameters,
  written: string[],
): Promise<Output> {
  const { index } = name;
  if (data.length > deps.config.MAX_IMAGE_BYTES) {
    throw new ProviderError('retryable', `output ${index + 1} of the provider is ${data.length} bytes, over the ${deps.config.MAX_IMAGE_BYTES}-byte limit`);
  }
  const { normalized, thumbnail } = await imageWork.run(async () => {
    const image = await normalizeImage(data, {
      width: params.width,
      height: params.height,
      format: params.output_format,
      maxPixels: deps.config.MAX_IMAGE_PIXELS,
    }).catch((err: unknown) => {
      throw err instanceof ImageDecodeError ? new ProviderError('retryable', `output ${index + 1} of the provider is ${err.message}`, { cause: err }) : err;
    });
    return { normalized: image, thumbnail: await makeThumbnail(image.data) };
  });
  const file = mediaFileName(name.jobId, name.attempt, name.token, index, params.output_format);
  const thumb = thumbnailFileName(name.jobId, name.attempt, name.token, index);
  written.push(thumb);
  await deps.storage.write(thumb, thumbnail);
  written.push(file);
  await deps.storage.write(file, normalized.data);
  return {
    url: `/media/${file}`,
    width: normalized.width,
    height: normalized.height,
    format: normalized.format,
    bytes: normalized.bytes,
    thumbnail_url: `/media/${thumb}`,
  };
}

/**
 * Records provider progress: at most one write in flight and at most one a second per job (the latest
 * value wins), so a chatty provider cannot flood the database. Completion itself ends progress.
 */
interface ProgressRecorder {
  record: (fraction: number) => void;
  /** No more writes (a delayed one is dropped). */
  stop: () => void;
}

function progressRecorder(deps: GenerateDeps, job: JobRow, attempt: number, log: Logger): ProgressRecorder {
  const jobId = job.id;
  // One statement, unless a webhook wants progress events (then the delivery commits with it).
  const wantsWebhook = job.webhook_url !== null && (job.webhook_events_filter ?? []).includes('progress');
  const write = (value: number) =>
    wantsWebhook
      ? deps.db.transaction().execute(async (trx) => {
          const row = await jobs.setProgress(trx, jobId, attempt, value);
          if (row) await enqueueWebhook(deps.boss, trx, row, 'progress', deps.config);
        })
      : jobs.setProgress(deps.db, jobId, attempt, value);
  let pending: number | undefined;
  let writing = false;
  let stopped = false;
  let lastWrite = 0;
  const flush = async (): Promise<void> => {
    if (writing || pending === undefined || stopped) return;
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
  return {
    record: (fraction) => {
      const value = Math.max(0, Math.min(1, fraction));
      if (value >= 1) return;
      pending = value;
      void flush();
    },
    stop: () => {
      stopped = true;
    },
  };
}
