-- Up Migration

-- The per-key queued-jobs cap, checked at COMMIT by a deferred constraint trigger on the new job: it
-- takes the owner's advisory lock (held until the commit ends), then counts with a fresh snapshot (each
-- statement of a VOLATILE function takes one), so it sees every submission that committed before it got
-- the lock. Concurrent submissions of one key on any API process cannot overshoot together, and since
-- the check runs inside COMMIT, the lock is held for no client round trip. The API sets the cap for its
-- transaction (`media.max_queued_jobs`); without it (the local principal, other writers) nothing is checked.
CREATE FUNCTION jobs_check_queued_cap() RETURNS trigger LANGUAGE plpgsql VOLATILE AS $$
DECLARE
  cap integer := nullif(current_setting('media.max_queued_jobs', true), '')::integer;
BEGIN
  IF cap IS NULL OR NEW.status <> 'queued' THEN
    RETURN NULL;
  END IF;
  PERFORM pg_advisory_xact_lock(hashtextextended(NEW.owner_id::text, 7331));
  IF (SELECT count(*) FROM (SELECT 1 FROM jobs WHERE owner_id = NEW.owner_id AND status = 'queued' LIMIT cap + 1) AS q) > cap THEN
    RAISE EXCEPTION 'the owner already has % jobs queued', cap USING ERRCODE = 'MG429', HINT = cap::text;
  END IF;
  RETURN NULL;
END $$;

CREATE CONSTRAINT TRIGGER jobs_queued_cap AFTER INSERT ON jobs DEFERRABLE INITIALLY DEFERRED
  FOR EACH ROW EXECUTE FUNCTION jobs_check_queued_cap();

-- Down Migration

DROP TRIGGER jobs_queued_cap ON jobs;
DROP FUNCTION jobs_check_queued_cap();
