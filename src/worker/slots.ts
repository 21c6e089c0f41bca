// A slot-based worker loop on pg-boss's own primitives (fetch, touch; the handler settles with complete
// or fail). One fetch loop feeds N slots: it takes as many jobs as there are free slots the moment one
// frees up, a wake-up arrives (LISTEN/NOTIFY) or the poll comes round (retries whose backoff elapsed).
// Every job runs on its own: its own AbortController, deadline (expireInSeconds) and claim check
// (heartbeat); nothing about one job holds or aborts another. Modelled on Graphile Worker's local queue.
import type { JobWithMetadata, PgBoss } from 'pg-boss';
import type { Logger } from '../logger.ts';
import type { QueueName, QueuePayloads } from '../queue/queue.ts';

/** Why a running job's signal was aborted. The handler reads `signal.reason` to tell them apart. */
export class JobStopped extends Error {
  readonly why: 'deadline' | 'claim-lost' | 'shutdown' | 'canceled';
  constructor(why: JobStopped['why'], message: string) {
    super(message);
    this.why = why;
  }
}

export type SlotJob<Q extends QueueName> = JobWithMetadata<QueuePayloads[Q]>;

export interface SlotLoopOptions<Q extends QueueName> {
  boss: PgBoss;
  queue: Q;
  /** Jobs run at once at most. */
  slots: number;
  /** Jobs one fetch takes at most (a fetch never takes more than the free slots). */
  fetchMax: number;
  /** How often to look for jobs without a wake-up (finds retries whose backoff has elapsed). */
  pollIntervalMs: number;
  /** Fetches at most this often when woken (coalesces bursts of wake-ups); 0 = no limit. */
  minFetchIntervalMs?: number;
  logger: Logger;
  /** Runs one job and settles it with pg-boss (complete or fail). Must honour `signal` and never throw. */
  run: (job: SlotJob<Q>, signal: AbortSignal) => Promise<void>;
}

export interface RunningJob {
  id: string;
  retryCount: number;
  abort(reason: JobStopped): void;
}

export interface SlotLoop {
  /** New work may be waiting: fetch now if a slot is free. */
  wake(): void;
  /** How many attempts are running now (each holds a slot). */
  busy(): number;
  /** Ids of the jobs running now. */
  runningIds(): string[];
  /** Aborts every running attempt of job `id` (a stale attempt may still run beside the current one). */
  abort(id: string, reason: JobStopped): void;
  /**
   * Stops fetching, waits up to `graceMs` for running jobs, then aborts the rest (`shutdown`) and waits
   * for their handlers to settle them (handed back to the queue for another worker).
   */
  stop(graceMs: number): Promise<void>;
}

const FETCH_ERROR_BACKOFF_MAX_MS = 5_000;
/** Jobs carry a heartbeat of at least 10 s (JOB_HEARTBEAT_SECONDS): refreshing every 5 s keeps every claim. */
const HEARTBEAT_INTERVAL_MS = 5_000;

export function startSlotLoop<Q extends QueueName>(options: SlotLoopOptions<Q>): SlotLoop {
  const { boss, queue, slots, logger } = options;
  const log = logger.child({ queue });
  // By attempt, not by job: an attempt that lost its claim may still be running beside the next one, and
  // it holds a slot until it ends.
  const running = new Map<string, RunningJob & { settled: Promise<void>; heartbeatSeconds: number }>();
  const attemptKey = (job: { id: string; retryCount: number }) => `${job.id}#${job.retryCount}`;
  let stopping = false;
  let fetching: Promise<void> | undefined;
  let wanted = true; // fetch at start
  let lastFetch = 0;
  let errorBackoffMs = 0;
  let timer: NodeJS.Timeout | undefined;
  let idle: (() => void) | undefined;
  let refillQueued = false;

  // Jobs that end together (one group commit settles dozens) free their slots in the same turn of the
  // event loop: one fetch for all of them then, rather than a fetch of one for the first.
  const refill = () => {
    wanted = true;
    if (refillQueued) return;
    refillQueued = true;
    setImmediate(() => {
      refillQueued = false;
      void loop();
    });
  };

  const schedule = (ms: number) => {
    clearTimeout(timer);
    timer = setTimeout(() => {
      wanted = true;
      void loop();
    }, ms);
    timer.unref();
  };

  const loop = async (): Promise<void> => {
    if (fetching || stopping) return;
    const free = slots - running.size;
    if (!wanted || free <= 0) return;
    const sinceLast = Date.now() - lastFetch;
    if (options.minFetchIntervalMs && sinceLast < options.minFetchIntervalMs) return schedule(options.minFetchIntervalMs - sinceLast);
    wanted = false;
    lastFetch = Date.now();
    const batchSize = Math.min(free, options.fetchMax);
    let fetched = 0;
    fetching = boss
      .fetch<QueuePayloads[Q]>(queue, { batchSize, includeMetadata: true })
      .then((jobs) => {
        fetched = jobs.length;
        errorBackoffMs = 0;
        for (const job of jobs) begin(job);
      })
      .catch((err: unknown) => {
        errorBackoffMs = Math.min(Math.max(errorBackoffMs * 2, 100), FETCH_ERROR_BACKOFF_MAX_MS);
        log.warn({ err, retryInMs: errorBackoffMs }, 'could not fetch jobs');
      });
    await fetching;
    fetching = undefined;
    // eslint-disable-next-line @typescript-eslint/no-unnecessary-condition -- stop() may have run during the fetch
    if (stopping) return;
    if (errorBackoffMs > 0) return schedule(errorBackoffMs);
    // A full fetch means more may be waiting: go again at once (a backlog drains at full speed).
    if (fetched === batchSize) wanted = true;
    schedule(options.pollIntervalMs);
    if (wanted) void loop();
  };

  const begin = (job: SlotJob<Q>) => {
    const controller = new AbortController();
    const abort = (reason: JobStopped) => {
      if (!controller.signal.aborted) controller.abort(reason);
    };
    const deadline = setTimeout(
      () => abort(new JobStopped('deadline', `the attempt timed out after ${job.expireInSeconds} s (JOB_TIMEOUT_SECONDS)`)),
      job.expireInSeconds * 1000,
    );
    deadline.unref();
    const entry = { id: job.id, retryCount: job.retryCount, abort, settled: Promise.resolve(), heartbeatSeconds: job.heartbeatSeconds ?? 0 };
    running.set(attemptKey(job), entry);
    entry.settled = options
      .run(job, controller.signal)
      .catch((err: unknown) => log.error({ err, jobId: job.id }, 'job handler threw (a bug): the queue will retry the job after its expiry'))
      .finally(() => {
        clearTimeout(deadline);
        running.delete(attemptKey(job));
        if (running.size === 0) idle?.();
        // A slot came free: take the next job now, not at the next wake-up.
        refill();
      });
  };

  // One heartbeat for all running jobs of this loop: a job whose claim is gone (the supervisor failed it
  // after a missed heartbeat, or an operator did) is aborted alone. A heartbeat that could not run says
  // nothing about the claims, so it aborts nothing.
  let beating = false;
  const heartbeat = setInterval(() => {
    if (beating || running.size === 0) return;
    const due = [...running.values()].filter((j) => j.heartbeatSeconds > 0);
    if (due.length === 0) return;
    beating = true;
    boss
      .touch(
        queue,
        due.map((j) => ({ id: j.id, retryCount: j.retryCount })),
      )
      .then((res) => {
        const settled = (res as { settled?: string[] }).settled;
        if (!settled) return;
        const alive = new Set(settled);
        for (const job of due) {
          if (!alive.has(job.id) && running.get(attemptKey(job)) === job) {
            job.abort(new JobStopped('claim-lost', 'this worker lost its claim on the job (heartbeat missed); another attempt owns it'));
          }
        }
      })
      .catch((err: unknown) => log.warn({ err }, 'heartbeat failed'))
      .finally(() => {
        beating = false;
      });
  }, HEARTBEAT_INTERVAL_MS);
  heartbeat.unref();

  schedule(0);

  return {
    busy: () => running.size,
    runningIds: () => [...new Set([...running.values()].map((j) => j.id))],
    abort(id, reason) {
      for (const job of running.values()) if (job.id === id) job.abort(reason);
    },
    wake() {
      wanted = true;
      void loop();
    },
    async stop(graceMs) {
      stopping = true;
      clearTimeout(timer);
      await fetching; // a fetch in flight still starts its jobs: they are ours now
      if (running.size > 0) {
        log.info({ running: running.size, graceMs }, 'waiting for running jobs');
        await new Promise<void>((resolve) => {
          idle = resolve;
          setTimeout(resolve, graceMs).unref();
        });
      }
      if (running.size > 0) {
        log.warn({ running: running.size }, 'grace period over: handing the remaining jobs back to the queue');
        for (const job of running.values()) job.abort(new JobStopped('shutdown', 'the worker shut down before the attempt finished'));
        await Promise.all([...running.values()].map((j) => j.settled));
      }
      clearInterval(heartbeat);
    },
  };
}
