// Housekeeping, scheduled every 10 minutes by pg-boss's cron and run by one worker at a time: forget
// idempotency keys past their retention, and remove temporary media files a crash left mid-write.
import type { PgBoss } from 'pg-boss';
import type { Config } from '../config.ts';
import type { Database } from '../db/database.ts';
import { expireIdempotencyKeys } from '../jobs/job.repository.ts';
import type { Logger } from '../logger.ts';
import type { MediaStorage } from '../media/storage.ts';
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
/** A temporary file older than this was left by a writer that died: no write takes an hour. */
const STALE_TEMPORARY_MS = 60 * 60 * 1000;

export async function runMaintenance(deps: MaintenanceDeps): Promise<void> {
  const forgotten = await expireIdempotencyKeys(deps.db, deps.config.IDEMPOTENCY_TTL_HOURS);
  if (forgotten > 0) deps.logger.info({ forgotten }, 'idempotency keys expired');
  const removed = (await deps.storage?.removeStaleTemporaries(STALE_TEMPORARY_MS)) ?? 0;
  if (removed > 0) deps.logger.info({ removed }, 'stale temporary media files removed');
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
