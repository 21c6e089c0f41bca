-- Up Migration

-- One row per job: the durable business record. pg-boss keeps its own queue rows in the pgboss schema.
CREATE TABLE jobs (
  id               uuid        PRIMARY KEY,
  status           text        NOT NULL DEFAULT 'queued'
                   CHECK (status IN ('queued', 'processing', 'completed', 'failed', 'canceled')),
  prompt           text        NOT NULL,
  parameters       jsonb       NOT NULL,
  provider         text        NOT NULL,
  attempts         integer     NOT NULL DEFAULT 0,
  last_error       text,
  error            text,
  outputs          jsonb       NOT NULL DEFAULT '[]',
  prediction_id    text,
  idempotency_key  text,
  request_hash     text,
  created_at       timestamptz NOT NULL DEFAULT now(),
  updated_at       timestamptz NOT NULL DEFAULT now(),
  started_at       timestamptz,
  finished_at      timestamptz
);

CREATE UNIQUE INDEX jobs_idempotency_key_idx ON jobs (idempotency_key) WHERE idempotency_key IS NOT NULL;
CREATE INDEX jobs_created_at_idx ON jobs (created_at DESC, id DESC);
CREATE INDEX jobs_status_idx ON jobs (status, created_at DESC) WHERE status IN ('queued', 'processing');

-- One row per attempt a worker started: when, how it ended, and what the provider said.
CREATE TABLE job_attempts (
  job_id             uuid        NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
  number             integer     NOT NULL,
  started_at         timestamptz NOT NULL DEFAULT now(),
  finished_at        timestamptz,
  outcome            text        NOT NULL DEFAULT 'running'
                     CHECK (outcome IN ('running', 'succeeded', 'failed', 'interrupted', 'canceled')),
  error              text,
  error_kind         text,
  prediction_id      text,
  predict_time_ms    integer,
  worker             text,
  PRIMARY KEY (job_id, number)
);

-- Down Migration

DROP TABLE job_attempts;
DROP TABLE jobs;
