// Housekeeping, scheduled every 10 minutes by pg-boss's cron and run by one worker at a time: forget
// idempotency keys past their retention, and remove media files nobody will serve: temporaries a crash
// left mid-write, and outputs of attempts that never completed their job (a worker died after writing).
import type { PgBoss } from 'pg-boss';
import type { Config } from '../config.ts';
import type { Database } from '../db/database.ts';
import { expireIdempotencyKeys, findFileOwners } from '../jobs/job.repository.ts';
import type { Logger } from '../logger.ts';
import { ownerOfFile, type MediaStorage } from '../media/storage.ts';
import { MAINTENANCE } from '../queue/queue.ts';
import type { SlotJob } from './slots.ts';

export interface MaintenanceDeps {
  db: Database;
  boss?: PgBoss;
  storage?: MediaStorage;
  config: Pick<Config, 'IDEMPOTENCY_TTL_HOURS'>;
  logger: Logger;
}

export const MAINTENANCE_CRON = '*/10 * * * *';
/** A file this old that nothing refers to was left by a writer that died: no attempt writes for an hour. */
const STRAY_AFTER_MS = 60 * 60 * 1000;

export async function runMaintenance(deps: MaintenanceDeps): Promise<void> {
  const forgotten = await expireIdempotencyKeys(deps.db, deps.config.IDEMPOTENCY_TTL_HOURS);
  if (forgotten > 0) deps.logger.info({ forgotten }, 'idempotency keys expired');
  if (!deps.storage) return;
  const temporaries = await deps.storage.removeStaleTemporaries(STRAY_AFTER_MS);
  const strays = await removeStrayOutputs(deps.db, deps.storage);
  if (temporaries + strays > 0) deps.logger.info({ temporaries, strays }, 'stray media files removed');
}

/**
 * Removes outputs no job refers to, of attempts that can no longer complete their job: the job has
 * finished (or is gone), or a later attempt owns it. Returns how many files went.
 */
export async function removeStrayOutputs(db: Database, storage: MediaStorage, olderThanMs = STRAY_AFTER_MS): Promise<number> {
  const files = (await storage.listOlderThan(olderThanMs)).flatMap((name) => {
    const owner = ownerOfFile(name);
    return owner ? [{ name, ...owner }] : [];
  });
  let removed = 0;
  for (let i = 0; i < files.length; i += 1000) {
    const chunk = files.slice(i, i + 1000);
    const owners = new Map((await findFileOwners(db, [...new Set(chunk.map((f) => f.jobId))])).map((j) => [j.id, j]));
    const stray = chunk.filter(({ name, jobId, attempt }) => {
      const job = owners.get(jobId);
      if (!job) return true;
      const referenced = ((job.outputs ?? []) as { url: string; thumbnail_url?: string }[]).some(
        (o) => o.url === `/media/${name}` || o.thumbnail_url === `/media/${name}`,
      );
      if (referenced) return false;
      return !['queued', 'processing'].includes(job.status) || attempt < job.attempts;
    });
    await storage.remove(stray.map((f) => f.name));
    removed += stray.length;
  }
  return removed;
}

export function createMaintenanceHandler(deps: MaintenanceDeps & { boss: PgBoss }): (job: SlotJob<'maintenance'>) => Promise<void> {
  return async (job) => {
    const attempt = { id: job.id, retryCount: job.retryCount };
    try {
      await runMaintenance(deps);
      await deps.boss.complete(MAINTENANCE, attempt);
    } catch (err) {
      deps.logger.warn({ err }, 'maintenance failed; it runs again at the next schedule');
      await deps.boss.fail(MAINTENANCE, attempt, { error: (err as Error).message }).catch(() => {});
    }
  };
}
