// Retention, scheduled every 10 minutes by pg-boss's cron and run by one worker at a time: deletes
// finished jobs older than JOB_RETENTION_DAYS with their attempts, events and webhook deliveries, then
// their files, in small batches; and folds the job counters of closed connections (every run, retention
// or not) so /metrics reads a few rows.
//
// Order: a batch's rows are deleted (committed) before its files. A crash in between leaves files that
// no row lists; the maintenance sweep removes those (outputs of a job that is gone) within the hour.
// The other order could leave a job listed as completed whose result_url answers 404.
import type { PgBoss } from 'pg-boss';
import type { Config } from '../config.ts';
import type { Database } from '../db/database.ts';
import { deleteFinishedJobs, foldJobCounts, type Output, type RetiredJob } from '../jobs/job.repository.ts';
import type { Logger } from '../logger.ts';
import type { MediaStorage } from '../media/storage.ts';
import { RETENTION } from '../queue/queue.ts';
import type { SlotJob } from './slots.ts';

export interface RetentionDeps {
  db: Database;
  storage: MediaStorage;
  config: Pick<Config, 'JOB_RETENTION_DAYS'>;
  logger: Logger;
}

export const RETENTION_CRON = '5-59/10 * * * *';
/** Jobs per transaction: short transactions, and a bounded number of files removed at once. */
export const RETENTION_BATCH = 500;
/** One run stops after this long; the next run goes on where it stopped. */
const RUN_BUDGET_MS = 5 * 60_000;

export interface RetentionOptions {
  batchSize?: number;
  /** Stops between batches once aborted (shutdown). */
  signal?: AbortSignal;
}

export interface RetentionResult {
  jobs: number;
  files: number;
  batches: number;
}

export async function runRetention(deps: RetentionDeps, options: RetentionOptions = {}): Promise<RetentionResult> {
  const folded = await foldJobCounts(deps.db);
  if (folded > 0) deps.logger.debug({ folded }, 'job counters of closed connections folded');
  const result: RetentionResult = { jobs: 0, files: 0, batches: 0 };
  const days = deps.config.JOB_RETENTION_DAYS;
  if (days === undefined) return result;
  const batchSize = options.batchSize ?? RETENTION_BATCH;
  const until = Date.now() + RUN_BUDGET_MS;
  for (;;) {
    const retired = await deleteFinishedJobs(deps.db, days, batchSize);
    if (retired.length === 0) break;
    const files = filesOf(retired);
    await deps.storage.remove(files);
    result.jobs += retired.length;
    result.files += files.length;
    result.batches++;
    if (retired.length < batchSize || options.signal?.aborted || Date.now() > until) break;
  }
  if (result.jobs > 0) deps.logger.info({ ...result, olderThanDays: days }, 'finished jobs past retention deleted');
  return result;
}

/** The stored names of the jobs' outputs and thumbnails. */
function filesOf(jobs: RetiredJob[]): string[] {
  return jobs.flatMap((job) =>
    (job.outputs as Output[]).flatMap((o) =>
      [o.url, o.thumbnail_url].filter((u): u is string => typeof u === 'string').map((u) => u.slice(u.lastIndexOf('/') + 1)),
    ),
  );
}

export function createRetentionHandler(deps: RetentionDeps & { boss: PgBoss }): (job: SlotJob<'retention'>, signal: AbortSignal) => Promise<void> {
  return async (job, signal) => {
    const attempt = { id: job.id, retryCount: job.retryCount };
    try {
      await runRetention(deps, { signal });
      await deps.boss.complete(RETENTION, attempt);
    } catch (err) {
      deps.logger.warn({ err }, 'retention failed; it runs again at the next schedule');
      await deps.boss.fail(RETENTION, attempt, { error: (err as Error).message }).catch(() => {});
    }
  };
}
