// Per-key limits: request rate (sustained + burst, counted in Postgres so every API replica shares
// them) and open event streams (per process: a stream lives on one replica). The queued-jobs cap is
// checked where jobs are submitted (job.service.ts), in the submitting transaction.
import { CompiledQuery } from 'kysely';
import type { RequestHandler } from 'express';
import { BurstyRateLimiter, RateLimiterPostgres, RateLimiterRes } from 'rate-limiter-flexible';
import type { Config } from '../config.ts';
import type { Database } from '../db/database.ts';
import { AppError } from '../errors.ts';
import { principalOf } from './authenticate.ts';
import type { Principal } from './principal.ts';

export type LimitsConfig = Pick<Config, 'KEY_RATE_LIMIT_PER_SECOND' | 'KEY_RATE_LIMIT_BURST' | 'KEY_MAX_QUEUED_JOBS' | 'KEY_MAX_EVENT_STREAMS'>;

/** Whether a principal is held to the per-key limits (the anonymous local principal is not). */
export function isLimited(principal: Principal): boolean {
  return !principal.local;
}

/** rate-limiter-flexible's Postgres store, over our Kysely pool (the table comes from a migration). */
function storeClient(db: Database) {
  return {
    query: async (q: { text: string; values?: unknown[] }) => {
      const result = await db.executeQuery(CompiledQuery.raw(q.text, q.values ?? []));
      return { rows: result.rows, rowCount: result.rows.length };
    },
  };
}

/**
 * 429 with Retry-After once a key has spent KEY_RATE_LIMIT_PER_SECOND requests in the current second
 * and KEY_RATE_LIMIT_BURST extra requests in the current minute. Applies to requests with a principal.
 */
export function createRateLimiter(db: Database, config: LimitsConfig): RequestHandler {
  if (config.KEY_RATE_LIMIT_PER_SECOND === 0) return (_req, _res, next) => next();
  const common = { storeClient: storeClient(db), storeType: 'client', tableName: 'rate_limits', tableCreated: true };
  const sustained = new RateLimiterPostgres({ ...common, keyPrefix: 'rate', points: config.KEY_RATE_LIMIT_PER_SECOND, duration: 1 });
  const burst = new RateLimiterPostgres({ ...common, keyPrefix: 'burst', points: config.KEY_RATE_LIMIT_BURST, duration: 60 });
  const limiter = config.KEY_RATE_LIMIT_BURST > 0 ? new BurstyRateLimiter(sustained, burst) : sustained;
  return async (_req, res, next) => {
    const principal = principalOf(res);
    if (!principal || !isLimited(principal)) return next();
    try {
      await limiter.consume(principal.keyId);
      next();
    } catch (err) {
      if (!(err instanceof RateLimiterRes)) return next(err);
      const limited = new AppError(
        'rate_limited',
        `this key made more than ${config.KEY_RATE_LIMIT_PER_SECOND} requests a second (and spent its burst allowance of ${config.KEY_RATE_LIMIT_BURST} a minute); retry later`,
      );
      limited.retryAfterSeconds = Math.max(1, Math.ceil(err.msBeforeNext / 1000));
      next(limited);
    }
  };
}

/** Open event streams per key in this process. */
export interface StreamSlots {
  /** Takes a slot for the principal, or throws AppError('rate_limited'); call the returned release once. */
  acquire(principal: Principal): () => void;
}

export function createStreamSlots(max: number): StreamSlots {
  const open = new Map<string, number>();
  return {
    acquire(principal) {
      if (max === 0 || !isLimited(principal)) return () => {};
      const n = open.get(principal.keyId) ?? 0;
      if (n >= max) {
        const refused = new AppError('rate_limited', `this key already has ${max} event streams open on this server; close one first`);
        refused.retryAfterSeconds = 5;
        throw refused;
      }
      open.set(principal.keyId, n + 1);
      let released = false;
      return () => {
        if (released) return;
        released = true;
        const left = (open.get(principal.keyId) ?? 1) - 1;
        if (left > 0) open.set(principal.keyId, left);
        else open.delete(principal.keyId);
      };
    },
  };
}
