-- Up Migration

-- Steering and following jobs: priority, progress, webhooks, and an event log that drives the live
-- streams (SSE) and worker-side cancellation through LISTEN/NOTIFY.
ALTER TABLE jobs
  ADD COLUMN priority               integer NOT NULL DEFAULT 0,
  ADD COLUMN progress               real CHECK (progress BETWEEN 0 AND 1),
  ADD COLUMN webhook_url            text,
  ADD COLUMN webhook_events_filter  text[],
  ADD COLUMN event_seq              integer NOT NULL DEFAULT 0;

-- Timestamps the API shows (and takes back in filters and cursors) have millisecond precision; so do
-- creation times, or a filter on a job's own created_at would include it.
ALTER TABLE jobs ALTER COLUMN created_at SET DEFAULT date_trunc('milliseconds', now());

-- Queue positions count the queued jobs ahead: higher priority first, then oldest first.
DROP INDEX jobs_status_idx;
CREATE INDEX jobs_queued_order_idx ON jobs (priority DESC, created_at, id) WHERE status = 'queued';
CREATE INDEX jobs_status_created_idx ON jobs (status, created_at DESC, id DESC);

-- One row per change of a job's status or progress, numbered per job (the SSE event id).
CREATE TABLE job_events (
  job_id      uuid        NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
  seq         integer     NOT NULL,
  status      text        NOT NULL,
  progress    real,
  created_at  timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (job_id, seq)
);

-- Every write path records its event and notifies listeners in the same transaction, so a stream can
-- neither miss a change nor see one that rolled back.
CREATE FUNCTION jobs_record_event() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF TG_OP = 'INSERT' OR NEW.status IS DISTINCT FROM OLD.status OR NEW.progress IS DISTINCT FROM OLD.progress THEN
    NEW.event_seq := CASE WHEN TG_OP = 'INSERT' THEN 1 ELSE OLD.event_seq + 1 END;
    INSERT INTO job_events (job_id, seq, status, progress) VALUES (NEW.id, NEW.event_seq, NEW.status, NEW.progress);
    PERFORM pg_notify('job_events', json_build_object('job_id', NEW.id, 'seq', NEW.event_seq, 'status', NEW.status)::text);
  END IF;
  RETURN NEW;
END $$;

-- BEFORE, so the new event_seq is stored on the row itself; the job_events row references the job,
-- so for inserts the event is written by an AFTER trigger once the row exists.
CREATE FUNCTION jobs_record_first_event() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  INSERT INTO job_events (job_id, seq, status, progress) VALUES (NEW.id, 1, NEW.status, NEW.progress);
  PERFORM pg_notify('job_events', json_build_object('job_id', NEW.id, 'seq', 1, 'status', NEW.status)::text);
  RETURN NULL;
END $$;

CREATE TRIGGER jobs_event_on_update BEFORE UPDATE OF status, progress ON jobs
  FOR EACH ROW WHEN (NEW.status IS DISTINCT FROM OLD.status OR NEW.progress IS DISTINCT FROM OLD.progress)
  EXECUTE FUNCTION jobs_record_event();
CREATE TRIGGER jobs_event_on_insert AFTER INSERT ON jobs
  FOR EACH ROW EXECUTE FUNCTION jobs_record_first_event();
ALTER TABLE jobs ALTER COLUMN event_seq SET DEFAULT 1;

-- One row per webhook delivery (an event of a job sent to its webhook_url), with every try recorded.
CREATE TABLE webhook_deliveries (
  id            uuid        PRIMARY KEY,
  job_id        uuid        NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
  event         text        NOT NULL CHECK (event IN ('start', 'progress', 'completed')),
  url           text        NOT NULL,
  payload       jsonb       NOT NULL,
  status        text        NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'delivered', 'failed')),
  attempts      integer     NOT NULL DEFAULT 0,
  last_status_code integer,
  last_error    text,
  history       jsonb       NOT NULL DEFAULT '[]',
  created_at    timestamptz NOT NULL DEFAULT now(),
  delivered_at  timestamptz
);
CREATE INDEX webhook_deliveries_job_idx ON webhook_deliveries (job_id, created_at);

-- Service-wide settings generated on first use (the webhook signing secret when none is configured).
CREATE TABLE settings (
  name   text PRIMARY KEY,
  value  text NOT NULL
);

-- Down Migration

DROP TABLE settings;
DROP TABLE webhook_deliveries;
DROP TRIGGER jobs_event_on_insert ON jobs;
DROP TRIGGER jobs_event_on_update ON jobs;
DROP FUNCTION jobs_record_first_event();
DROP FUNCTION jobs_record_event();
DROP TABLE job_events;
DROP INDEX jobs_status_created_idx;
ALTER TABLE jobs ALTER COLUMN created_at SET DEFAULT now();
DROP INDEX jobs_queued_order_idx;
CREATE INDEX jobs_status_idx ON jobs (status, created_at DESC) WHERE status IN ('queued', 'processing');
ALTER TABLE jobs
  DROP COLUMN event_seq,
  DROP COLUMN webhook_events_filter,
  DROP COLUMN webhook_url,
  DROP COLUMN progress,
  DROP COLUMN priority;
