-- Up Migration

-- Fleet-wide rate limits of outside providers (Replicate's prediction creates), shared by every worker
-- process: one row per limit, holding the instant up to which its tokens are booked (a token bucket kept
-- as GCRA's "theoretical arrival time"; see src/providers/rate-limit.ts). UNLOGGED: a crash that loses it
-- only refills the bucket.
CREATE UNLOGGED TABLE provider_rate_limits (
  name         text PRIMARY KEY,
  booked_until timestamptz NOT NULL
);

-- Down Migration

DROP TABLE provider_rate_limits;
