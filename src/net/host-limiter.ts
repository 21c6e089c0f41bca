// At most `cap` calls in flight per destination host in this process, so one slow host cannot take
// every slot. A caller over the cap waits its turn, but only up to a bound: then it is told no and
// should come back later instead of holding its slot.

export interface HostLimiter {
  /** A release function once a place is free, or undefined when none freed within `waitMs`. */
  acquire(host: string, waitMs: number): Promise<(() => void) | undefined>;
  /** Calls in flight to `host` (for tests and metrics). */
  active(host: string): number;
}

interface HostState {
  active: number;
  waiting: (() => void)[];
}

export function createHostLimiter(cap: number): HostLimiter {
  const hosts = new Map<string, HostState>();

  const releaser = (host: string, state: HostState) => {
    let released = false;
    return () => {
      if (released) return;
      released = true;
      const next = state.waiting.shift();
      if (next) return next(); // the place passes straight to the next waiter
      state.active -= 1;
      if (state.active === 0) hosts.delete(host);
    };
  };

  return {
    acquire(host, waitMs) {
      let state = hosts.get(host);
      if (!state) hosts.set(host, (state = { active: 0, waiting: [] }));
      if (state.active < cap) {
        state.active += 1;
        return Promise.resolve(releaser(host, state));
      }
      const s = state;
      return new Promise((resolve) => {
        const grant = () => {
          clearTimeout(timer);
          resolve(releaser(host, s));
        };
        const timer = setTimeout(() => {
          s.waiting.splice(s.waiting.indexOf(grant), 1);
          resolve(undefined);
        }, waitMs);
        s.waiting.push(grant);
      });
    },
    active: (host) => hosts.get(host)?.active ?? 0,
  };
}
