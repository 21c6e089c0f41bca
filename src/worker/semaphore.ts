// At most `limit` holders at once; the others wait their turn, first come first served.
export interface Semaphore {
  /** Runs `fn` once a place is free. */
  run<T>(fn: () => Promise<T>): Promise<T>;
}

export function createSemaphore(limit: number): Semaphore {
  let active = 0;
  const waiting: (() => void)[] = [];
  return {
    async run(fn) {
      if (active >= limit) await new Promise<void>((resolve) => waiting.push(resolve));
      else active++;
      try {
        return await fn();
      } finally {
        // The place passes straight to the next waiter, or is given back.
        const next = waiting.shift();
        if (next) next();
        else active--;
      }
    },
  };
}
