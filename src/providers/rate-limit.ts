// A token bucket shared by every process on one database: the fleet-wide limit of a provider's calls
// (Replicate's prediction creates per account). One row per limit holds the instant up to which its
// tokens are booked (GCRA's "theoretical arrival time"); taking a token is one atomic upsert that books
// the next free instant and says how long to wait for it. The wait happens here, with no database
// connection held, and a caller that gives up before its instant hands the token back when nobody booked
// after it. The database's clock is the only clock, so hosts whose clocks differ still share one schedule.
import { setTimeout as sleep } from 'node:timers/promises';
import { sql } from 'kysely';
import type { Database } from '../db/database.ts';

export interface SharedRateLimitOptions {
  /** The limit's name (its row): every process using the same name shares one bucket. */
  name: string;
  /** Sustained rate: tokens per minute. */
  perMinute: number;
  /** Bucket size: how many tokens an idle bucket gives at once (≥ 1; 1 = evenly spaced). */
  burst: number;
}

export interface RateLimit {
  /**
   * Books a token and waits until it is due. Rejects with the signal's reason if the signal aborts
   * first (the token is handed back when possible), or with RateLimitBookedError if the next free
   * token is more than `maxWaitMs` away (nothing is booked then).
   */
  take(signal: AbortSignal, maxWaitMs: number): Promise<void>;
}

/** The bucket is booked further ahead than the caller may wait. */
export class RateLimitBookedError extends Error {
  constructor(limit: string, maxWaitMs: number) {
    super(`the shared rate limit ${JSON.stringify(limit)} is booked more than ${Math.round(maxWaitMs / 1000)} s ahead`);
    this.name = 'RateLimitBookedError';
  }
}

export function createSharedRateLimit(db: Database, options: SharedRateLimitOptions): RateLimit {
  if (!(options.perMinute > 0)) throw new Error('a shared rate limit needs perMinute > 0');
  const burst = Math.max(1, Math.floor(options.burst));
  // Milliseconds between tokens; the interval is computed by Postgres from the same number every time.
  const spacingMs = 60_000 / options.perMinute;
  const spacing = sql`(${spacingMs}::float8 * interval '1 millisecond')`;

  return {
    async take(signal, maxWaitMs) {
      signal.throwIfAborted();
      // Booked tokens are spaced `spacing` apart; a token is due `burst` spacings before the end of the
      // booking it makes (an idle bucket: at once). The WHERE refuses a booking due beyond maxWaitMs.
      const booked = await sql<{ booked_until: string; wait_ms: number }>`
        INSERT INTO provider_rate_limits AS l (name, booked_until)
        VALUES (${options.name}, clock_timestamp() + ${spacing})
        ON CONFLICT (name) DO UPDATE
          SET booked_until = greatest(l.booked_until, clock_timestamp()) + ${spacing}
          WHERE l.booked_until + ${spacing} - ${burst}::int * ${spacing} <= clock_timestamp() + ${maxWaitMs}::float8 * interval '1 millisecond'
        RETURNING booked_until::text,
          greatest(0, extract(epoch FROM booked_until - ${burst}::int * ${spacing} - clock_timestamp()) * 1000)::float8 AS wait_ms`.execute(db);
      const row = booked.rows.at(0);
      if (!row) throw new RateLimitBookedError(options.name, maxWaitMs);
      if (row.wait_ms <= 0) return;
      try {
        await sleep(row.wait_ms, undefined, { signal });
      } catch (error) {
        // Hand the token back if ours is still the last booking (a later one keeps its instant, so
        // moving the end back then would let two tokens fall due together).
        await sql`UPDATE provider_rate_limits SET booked_until = booked_until - ${spacing}
                   WHERE name = ${options.name} AND booked_until = ${row.booked_until}::timestamptz`
          .execute(db)
          .catch(() => undefined);
        throw signal.aborted ? signal.reason : error;
      }
    },
  };
}
