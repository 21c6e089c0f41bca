// Group commit: writes asked for while a flush runs are queued and flushed together when it ends, so
// under load many jobs share one transaction, and at idle a write is flushed at once. Failures are never
// shared: when a group flush fails, each of its items is retried on its own (with backoff, while the
// error is one a retry can cure), so one bad item or a database hiccup costs no other item anything.

export interface GroupCommitOptions {
  /** Whether a failed flush is worth trying again (a lost connection, a deadlock, a restart). */
  isTransient: (err: unknown) => boolean;
  /** Delay before the n-th retry of an item on its own (n = 1, 2, …). */
  retryDelayMs?: (n: number) => number;
}

export type Commit<T, R> = (item: T, signal?: AbortSignal) => Promise<R>;

interface Pending<T, R> {
  item: T;
  signal?: AbortSignal;
  resolve: (r: R) => void;
  reject: (e: unknown) => void;
}

const defaultDelay = (n: number) => Math.min(100 * 2 ** (n - 1), 5_000);

export function groupCommit<T, R>(flush: (items: T[]) => Promise<R[]>, options: GroupCommitOptions): Commit<T, R> {
  const delay = options.retryDelayMs ?? defaultDelay;
  let queue: Pending<T, R>[] = [];
  let flushing = false;

  const run = async () => {
    if (flushing || queue.length === 0) return;
    flushing = true;
    const taken = queue;
    queue = [];
    try {
      const results = await flush(taken.map((p) => p.item));
      taken.forEach((p, i) => p.resolve(results[i]));
    } catch (err) {
      if (taken.length === 1 && !options.isTransient(err)) taken[0].reject(err);
      else for (const p of taken) void retryAlone(p, taken.length === 1 ? 1 : 0);
    } finally {
      flushing = false;
      void run();
    }
  };

  // Retries one item in a transaction of its own until it commits, the error is not transient, or its
  // signal aborts (the job's claim is gone, or the worker stops).
  const retryAlone = async (p: Pending<T, R>, tries: number) => {
    for (let n = tries; ; n++) {
      if (n > 0) {
        const aborted = await sleep(delay(n), p.signal);
        if (aborted) return p.reject(p.signal?.reason);
      }
      try {
        const [result] = await flush([p.item]);
        return p.resolve(result);
      } catch (err) {
        if (!options.isTransient(err)) return p.reject(err);
      }
    }
  };

  return (item, signal) =>
    new Promise<R>((resolve, reject) => {
      queue.push({ item, signal, resolve, reject });
      void run();
    });
}

/** Sleeps `ms`; resolves true at once if `signal` aborts first. */
function sleep(ms: number, signal?: AbortSignal): Promise<boolean> {
  if (signal?.aborted) return Promise.resolve(true);
  return new Promise((resolve) => {
    const done = (aborted: boolean) => {
      clearTimeout(timer);
      signal?.removeEventListener('abort', onAbort);
      resolve(aborted);
    };
    const onAbort = () => done(true);
    const timer = setTimeout(() => done(false), ms);
    signal?.addEventListener('abort', onAbort, { once: true });
  });
}
