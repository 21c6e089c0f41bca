// Queue positions of the jobs event streams are watching: computed once per change for all the
// watchers of a job (not once per stream), at most every POSITION_DEBOUNCE_MS, while anyone watches.
import type { Database } from '../db/database.ts';
import type { JobEventHub } from '../jobs/job.events.ts';
import { findJob, queuePosition } from '../jobs/job.repository.ts';
import type { Logger } from '../logger.ts';

const POSITION_DEBOUNCE_MS = 200;

export interface QueuePositions {
  /** Calls `listener` with the job's position now and whenever it changes; returns the unsubscribe. */
  watch(jobId: string, listener: (position: number) => void): () => void;
  close(): void;
}

interface Watched {
  listeners: Set<(position: number) => void>;
  last?: number;
}

export function createQueuePositions(db: Database, events: JobEventHub, logger: Logger): QueuePositions {
  const watched = new Map<string, Watched>();
  let timer: NodeJS.Timeout | undefined;
  let running = false;
  let again = false;

  const refresh = async (jobId: string, entry: Watched) => {
    const row = await findJob(db, jobId);
    const position = row ? await queuePosition(db, row) : undefined;
    if (position === undefined || position === entry.last || watched.get(jobId) !== entry) return;
    entry.last = position;
    for (const listener of entry.listeners) listener(position);
  };

  // One pass at a time over every watched job; changes during a pass schedule another.
  const refreshAll = async () => {
    if (running) return void (again = true);
    running = true;
    try {
      do {
        again = false;
        await Promise.all([...watched].map(([jobId, entry]) => refresh(jobId, entry)));
        // eslint-disable-next-line @typescript-eslint/no-unnecessary-condition -- set by a call made meanwhile
      } while (again);
    } catch (err) {
      logger.warn({ err }, 'queue positions could not be computed');
    } finally {
      running = false;
    }
  };
  const schedule = () => {
    if (timer || watched.size === 0) return;
    timer = setTimeout(() => {
      timer = undefined;
      void refreshAll();
    }, POSITION_DEBOUNCE_MS);
  };
  const offAny = events.onAny(schedule);
  const offResync = events.onResync(schedule);

  return {
    watch(jobId, listener) {
      let entry = watched.get(jobId);
      if (!entry) {
        entry = { listeners: new Set() };
        watched.set(jobId, entry);
        const first = entry;
        void refresh(jobId, first).catch((err) => logger.warn({ err, jobId }, 'queue position could not be computed'));
      } else if (entry.last !== undefined) {
        listener(entry.last);
      }
      entry.listeners.add(listener);
      const mine = entry;
      return () => {
        mine.listeners.delete(listener);
        if (mine.listeners.size === 0 && watched.get(jobId) === mine) watched.delete(jobId);
      };
    },
    close() {
      offAny();
      offResync();
      clearTimeout(timer);
      watched.clear();
    },
  };
}
