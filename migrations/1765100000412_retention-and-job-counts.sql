-- Up Migration

-- Flat cost as history grows (retention, and counts that do not scan history).

-- Retention finds finished jobs past their age oldest first, reading only those.
CREATE INDEX jobs_finished_at_idx ON jobs (finished_at) WHERE status IN ('completed', 'failed', 'canceled');

-- Jobs by status, for /metrics, kept by triggers instead of counted at each scrape. Each database
-- backend adds its changes to rows of its own (backend_pid), so concurrent transactions never wait on
-- one another's counter rows (nor deadlock on them); retention folds the rows of backends that are
-- gone into backend_pid 0. The count of a status is the sum of its rows.
CREATE TABLE job_status_counts (
  backend_pid  integer NOT NULL,
  status       text    NOT NULL,
  n            bigint  NOT NULL,
  PRIMARY KEY (backend_pid, status)
);

-- Inserts and deletes count per statement (a batch is one upsert per status), status changes per row.
CREATE FUNCTION jobs_count_inserted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  INSERT INTO job_status_counts AS c (backend_pid, status, n)
    SELECT pg_backend_pid(), status, count(*) FROM inserted GROUP BY status
    ON CONFLICT (backend_pid, status) DO UPDATE SET n = c.n + excluded.n;
  RETURN NULL;
END $$;

CREATE FUNCTION jobs_count_deleted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  INSERT INTO job_status_counts AS c (backend_pid, status, n)
    SELECT pg_backend_pid(), status, -count(*) FROM deleted GROUP BY status
    ON CONFLICT (backend_pid, status) DO UPDATE SET n = c.n + excluded.n;
  RETURN NULL;
END $$;

CREATE FUNCTION jobs_count_status_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  INSERT INTO job_status_counts AS c (backend_pid, status, n) VALUES (pg_backend_pid(), OLD.status, -1), (pg_backend_pid(), NEW.status, 1)
    ON CONFLICT (backend_pid, status) DO UPDATE SET n = c.n + excluded.n;
  RETURN NULL;
END $$;

CREATE FUNCTION jobs_count_truncated() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  DELETE FROM job_status_counts;
  RETURN NULL;
END $$;

CREATE TRIGGER jobs_count_on_insert AFTER INSERT ON jobs REFERENCING NEW TABLE AS inserted
  FOR EACH STATEMENT EXECUTE FUNCTION jobs_count_inserted();
CREATE TRIGGER jobs_count_on_delete AFTER DELETE ON jobs REFERENCING OLD TABLE AS deleted
  FOR EACH STATEMENT EXECUTE FUNCTION jobs_count_deleted();
CREATE TRIGGER jobs_count_on_status AFTER UPDATE OF status ON jobs
  FOR EACH ROW WHEN (NEW.status IS DISTINCT FROM OLD.status) EXECUTE FUNCTION jobs_count_status_change();
CREATE TRIGGER jobs_count_on_truncate AFTER TRUNCATE ON jobs
  FOR EACH STATEMENT EXECUTE FUNCTION jobs_count_truncated();

-- The jobs already there (the triggers above hold the table's lock until this migration commits, so
-- no change can slip between the count and them).
INSERT INTO job_status_counts (backend_pid, status, n) SELECT 0, status, count(*) FROM jobs GROUP BY status;

-- Down Migration

DROP TRIGGER jobs_count_on_truncate ON jobs;
DROP TRIGGER jobs_count_on_status ON jobs;
DROP TRIGGER jobs_count_on_delete ON jobs;
DROP TRIGGER jobs_count_on_insert ON jobs;
DROP FUNCTION jobs_count_truncated();
DROP FUNCTION jobs_count_status_change();
DROP FUNCTION jobs_count_deleted();
DROP FUNCTION jobs_count_inserted();
DROP TABLE job_status_counts;
DROP INDEX jobs_finished_at_idx;
