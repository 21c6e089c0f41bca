-- Up Migration

-- Who may do what: API keys (stored as SHA-256 hashes; the key itself is shown once, at creation)
-- own what they create. A built-in row stands for the anonymous local principal (requests without a
-- key while the API is bound to a loopback address), so every job has an owner.
CREATE TABLE api_keys (
  id              uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
  name            text        NOT NULL,
  -- The first characters of the key, to recognise it in lists and revoke it by them.
  prefix          text        NOT NULL,
  -- hex SHA-256 of the whole key; NULL only for the built-in local principal, which has no key.
  key_hash        text        UNIQUE,
  operator        boolean     NOT NULL DEFAULT false,
  -- Highest job priority this key may ask for (NULL: the configured default).
  max_priority    integer     CHECK (max_priority BETWEEN 0 AND 100),
  -- The key's webhook signing secret (`whsec_<base64>`); generated on first use.
  webhook_secret  text,
  created_at      timestamptz NOT NULL DEFAULT now(),
  revoked_at      timestamptz
);
CREATE INDEX api_keys_prefix_idx ON api_keys (prefix);

INSERT INTO api_keys (id, name, prefix, webhook_secret)
  VALUES ('00000000-0000-0000-0000-000000000000', 'local (anonymous on a loopback address)', '',
          (SELECT value FROM settings WHERE name = 'webhook_secret'));
-- Its secret (the one generated before keys existed) now lives on its row.
DROP TABLE settings;

-- Every job belongs to the key that created it; jobs from before keys existed belong to the local one.
ALTER TABLE jobs ADD COLUMN owner_id uuid NOT NULL DEFAULT '00000000-0000-0000-0000-000000000000' REFERENCES api_keys (id);
ALTER TABLE jobs ALTER COLUMN owner_id DROP DEFAULT;

-- Idempotency keys are per owner: one client cannot take (or probe) another's key.
DROP INDEX jobs_idempotency_key_idx;
CREATE UNIQUE INDEX jobs_owner_idempotency_key_idx ON jobs (owner_id, idempotency_key) WHERE idempotency_key IS NOT NULL;
-- A key's own listing, newest first, and its queued jobs (the queued-jobs cap counts them).
CREATE INDEX jobs_owner_created_idx ON jobs (owner_id, created_at DESC, id DESC);
CREATE INDEX jobs_owner_queued_idx ON jobs (owner_id) WHERE status = 'queued';

-- Request-rate counters shared by every API process (rate-limiter-flexible's Postgres store, its own
-- schema). UNLOGGED: counters need no fsync and may be lost in a crash.
CREATE UNLOGGED TABLE rate_limits (
  key     varchar(255) PRIMARY KEY,
  points  integer NOT NULL DEFAULT 0,
  expire  bigint
);

-- Down Migration

DROP TABLE rate_limits;
DROP INDEX jobs_owner_queued_idx;
DROP INDEX jobs_owner_created_idx;
DROP INDEX jobs_owner_idempotency_key_idx;
CREATE UNIQUE INDEX jobs_idempotency_key_idx ON jobs (idempotency_key) WHERE idempotency_key IS NOT NULL;
ALTER TABLE jobs DROP COLUMN owner_id;
CREATE TABLE settings (name text PRIMARY KEY, value text NOT NULL);
INSERT INTO settings (name, value)
  SELECT 'webhook_secret', webhook_secret FROM api_keys
  WHERE id = '00000000-0000-0000-0000-000000000000' AND webhook_secret IS NOT NULL;
DROP TABLE api_keys;
