// All SQL about jobs and their attempts. Functions take the database (or a transaction) first.
import { sql, type Selectable } from 'kysely';
import type { Database, Tx } from '../db/database.ts';
import type { JobAttempts, Jobs } from '../db/types.ts';
import type { components } from '../http/api-types.ts';
import type { ResolvedParameters } from './parameters.ts';

export type JobRow = Selectable<Jobs>;
export type AttemptRow = Selectable<JobAttempts>;
export type JobState = components['schemas']['JobState'];
export type Output = components['schemas']['Output'];

const ACTIVE: JobState[] = ['queued', 'processing'];

export interface NewJob {
  id: string;
  /** The api_keys row the job belongs to. */
  ownerId: string;
  prompt: string;
  parameters: ResolvedParameters;
  provider: string;
  priority: number;
  webhookUrl?: string;
  webhookEventsFilter?: string[];
  idempotencyKey?: string;
  requestHash?: string;
}

/** Inserts the row, or returns undefined when the idempotency key is already taken. */
export async function insertJob(trx: Tx, job: NewJob): Promise<JobRow | undefined> {
  return trx
    .insertInto('jobs')
    .values({
      id: job.id,
      owner_id: job.ownerId,
      prompt: job.prompt,
      parameters: JSON.stringify(job.parameters),
      provider: job.provider,
      priority: job.priority,
      webhook_url: job.webhookUrl ?? null,
      webhook_events_filter: job.webhookUrl ? (job.webhookEventsFilter ?? ['completed']) : null,
      idempotency_key: job.idempotencyKey ?? null,
      request_hash: job.requestHash ?? null,
    })
    .onConflict((oc) => oc.columns(['owner_id', 'idempotency_key']).where('idempotency_key', 'is not', null).doNothing())
    .returningAll()
    .executeTakeFirst();
}

export async function findJob(db: Database | Tx, id: string): Promise<JobRow | undefined> {
  return db.selectFrom('jobs').selectAll().where('id', '=', id).executeTakeFirst();
}

/** Whose jobs a query may see: one owner's, or (an operator) everyone's. */
export interface Scope {
  ownerId: string;
  all: boolean;
}

/** The job, if it exists and `scope` may see it (another owner's job is as absent as an unknown one). */
export async function findScopedJob(db: Database | Tx, id: string, scope: Scope): Promise<JobRow | undefined> {
  let q = db.selectFrom('jobs').selectAll().where('id', '=', id);
  if (!scope.all) q = q.where('owner_id', '=', scope.ownerId);
  return q.executeTakeFirst();
}

/** Whose job this is (the media route checks a caller's key against it). */
export async function findJobOwner(db: Database, id: string): Promise<string | undefined> {
  return (await db.selectFrom('jobs').select('owner_id').where('id', '=', id).executeTakeFirst())?.owner_id;
}

export async function findJobByIdempotencyKey(db: Database | Tx, ownerId: string, key: string): Promise<JobRow | undefined> {
  return db.selectFrom('jobs').selectAll().where('owner_id', '=', ownerId).where('idempotency_key', '=', key).executeTakeFirst();
}

/**
 * Caps the owner's queued jobs for the jobs this transaction inserts: checked at COMMIT (see the
 * queued-cap migration), which then fails with QUEUED_CAP_EXCEEDED and rolls everything back.
 */
export async function capQueuedJobs(trx: Tx, cap: number): Promise<void> {
  await sql`select set_config('media.max_queued_jobs', ${String(cap)}, true)`.execute(trx);
}

/** The SQLSTATE of a commit refused by the queued-jobs cap. */
export const QUEUED_CAP_EXCEEDED = 'MG429';

export async function listAttempts(db: Database, jobId: string): Promise<AttemptRow[]> {
  return db.selectFrom('job_attempts').selectAll().where('job_id', '=', jobId).orderBy('number').execute();
}

export interface AttemptStart {
  jobId: string;
  number: number;
}

/**
 * Begins attempts, a whole fetched batch in three statements: marks the jobs processing, closes any
 * attempt a dead worker left open as `interrupted`, and records the new attempts. Returns the rows of
 * the jobs that started; a job already finished (a replay) or canceled is absent and nothing is written
 * for it.
 */
export async function startAttempts(trx: Tx, starts: AttemptStart[], worker: string): Promise<JobRow[]> {
  if (starts.length === 0) return [];
  const ids = starts.map((s) => s.jobId);
  const numbers = starts.map((s) => s.number);
  const rows = await trx
    .updateTable('jobs')
    .from(sql<{ id: string; number: number }>`(select * from unnest(${ids}::uuid[], ${numbers}::int[]) as t(id, number))`.as('a'))
    .set({
      status: 'processing',
      attempts: sql`a.number`,
      progress: null,
      started_at: sql`coalesce(jobs.started_at, now())`,
      updated_at: sql`now()`,
    })
    .whereRef('jobs.id', '=', sql.ref('a.id'))
    .where('jobs.status', 'in', ACTIVE)
    .returningAll('jobs')
    .execute();
  if (rows.length === 0) return rows;
  const startedIds = rows.map((r) => r.id);
  if (rows.some((r) => r.attempts > 1)) {
    await trx
      .updateTable('job_attempts')
      .set({
        outcome: 'interrupted',
        finished_at: sql`now()`,
        error: 'the worker stopped before this attempt finished (crash, kill or expiry)',
        error_kind: 'interrupted',
      })
      .where('job_id', 'in', startedIds)
      .where('outcome', '=', 'running')
      .execute();
  }
  await trx
    .insertInto('job_attempts')
    .values(rows.map((r) => ({ job_id: r.id, number: r.attempts, worker })))
    .onConflict((oc) => oc.columns(['job_id', 'number']).doUpdateSet({ started_at: sql`now()`, outcome: 'running', finished_at: null, error: null, worker }))
    .execute();
  return rows;
}

export async function recordPrediction(db: Database, jobId: string, number: number, predictionId: string): Promise<void> {
  await db.transaction().execute(async (trx) => {
    await trx.updateTable('job_attempts').set({ prediction_id: predictionId }).where('job_id', '=', jobId).where('number', '=', number).execute();
    await trx
      .updateTable('jobs')
      .set({ prediction_id: predictionId, updated_at: sql`now()` })
      .where('id', '=', jobId)
      .execute();
  });
}

export interface AttemptReport {
  predictionId?: string;
  predictTimeMs?: number;
}

export interface Completion extends AttemptReport {
  jobId: string;
  number: number;
  outputs: Output[];
}

/**
 * Completes jobs, any number in two statements. A job completes only while the attempt still owns it;
 * returns the rows that completed (a stale replay, or a job canceled meanwhile, is absent and its
 * attempt ends `canceled`).
 */
export async function completeJobs(trx: Tx, completions: Completion[]): Promise<JobRow[]> {
  if (completions.length === 0) return [];
  const records = JSON.stringify(
    completions.map((c) => ({
      id: c.jobId,
      number: c.number,
      outputs: c.outputs,
      prediction_id: c.predictionId ?? null,
      predict_time_ms: c.predictTimeMs === undefined ? null : Math.round(c.predictTimeMs),
    })),
  );
  const done = sql`(select * from jsonb_to_recordset(${records}::jsonb) as r(id uuid, number int, outputs jsonb, prediction_id text, predict_time_ms int))`;
  const rows = await trx
    .updateTable('jobs')
    .from(done.as('c'))
    .set({
      status: 'completed',
      outputs: sql`c.outputs`,
      last_error: null,
      progress: null,
      finished_at: sql`now()`,
      updated_at: sql`now()`,
      prediction_id: sql`coalesce(c.prediction_id, jobs.prediction_id)`,
    })
    .whereRef('jobs.id', '=', sql.ref('c.id'))
    .whereRef('jobs.attempts', '=', sql.ref('c.number'))
    .where('jobs.status', '=', 'processing')
    .returningAll('jobs')
    .execute();
  const completed = rows.map((r) => r.id);
  await trx
    .updateTable('job_attempts')
    .from(done.as('c'))
    .set({
      outcome: completed.length ? sql`case when c.id = any(${completed}::uuid[]) then 'succeeded' else 'canceled' end` : 'canceled',
      error: completed.length ? sql`case when c.id = any(${completed}::uuid[]) then null else 'the job was canceled' end` : 'the job was canceled',
      error_kind: completed.length ? sql`case when c.id = any(${completed}::uuid[]) then null else 'canceled' end` : 'canceled',
      finished_at: sql`now()`,
      prediction_id: sql`coalesce(c.prediction_id, job_attempts.prediction_id)`,
      predict_time_ms: sql`coalesce(c.predict_time_ms, job_attempts.predict_time_ms)`,
    })
    .whereRef('job_attempts.job_id', '=', sql.ref('c.id'))
    .whereRef('job_attempts.number', '=', sql.ref('c.number'))
    .where('job_attempts.outcome', '=', 'running')
    .execute();
  return rows;
}

export interface AttemptFailure extends AttemptReport {
  error: string;
  kind: string;
  /** Whether the job fails for good now (permanent error, or the last retry). */
  final: boolean;
}

/** Records a failed attempt; the job either waits for its retry (`queued`) or fails for good. */
export async function failAttempt(trx: Tx, jobId: string, number: number, failure: AttemptFailure): Promise<JobRow | undefined> {
  const job = await trx
    .updateTable('jobs')
    .set({
      status: failure.final ? 'failed' : 'queued',
      last_error: failure.error,
      error: failure.final ? failure.error : null,
      progress: null,
      finished_at: failure.final ? sql`now()` : null,
      updated_at: sql`now()`,
      ...(failure.predictionId ? { prediction_id: failure.predictionId } : {}),
    })
    .where('id', '=', jobId)
    .where('status', '=', 'processing')
    .where('attempts', '=', number)
    .returningAll()
    .executeTakeFirst();
  await endAttempt(trx, jobId, number, job ? 'failed' : 'canceled', failure, failure);
  return job;
}

/** Ends a running attempt whose job was canceled meanwhile. */
export async function cancelAttempt(db: Database | Tx, jobId: string, number: number, report: AttemptReport): Promise<void> {
  await endAttempt(db, jobId, number, 'canceled', { error: 'the job was canceled', kind: 'canceled' }, report);
}

async function endAttempt(
  trx: Database | Tx,
  jobId: string,
  number: number,
  outcome: 'succeeded' | 'failed' | 'canceled',
  failure: { error: string; kind: string } | undefined,
  report: AttemptReport,
): Promise<void> {
  await trx
    .updateTable('job_attempts')
    .set({
      outcome,
      finished_at: sql`now()`,
      error: failure?.error ?? null,
      error_kind: failure?.kind ?? null,
      ...(report.predictionId ? { prediction_id: report.predictionId } : {}),
      ...(report.predictTimeMs === undefined ? {} : { predict_time_ms: Math.round(report.predictTimeMs) }),
    })
    .where('job_id', '=', jobId)
    .where('number', '=', number)
    .where('outcome', '=', 'running')
    .execute();
}

/**
 * Fails a job the queue gave up on without our handler finishing it (a worker died on the last attempt,
 * or the job expired). Leaves finished jobs alone; returns the row when it changed it.
 */
export async function failAbandonedJob(trx: Tx, jobId: string, reason: string): Promise<JobRow | undefined> {
  const job = await trx
    .updateTable('jobs')
    .set({
      status: 'failed',
      error: sql<string>`coalesce(last_error, ${reason})`,
      progress: null,
      finished_at: sql`now()`,
      updated_at: sql`now()`,
    })
    .where('id', '=', jobId)
    .where('status', 'in', ACTIVE)
    .returningAll()
    .executeTakeFirst();
  await trx
    .updateTable('job_attempts')
    .set({ outcome: 'interrupted', finished_at: sql`now()`, error: reason, error_kind: 'interrupted' })
    .where('job_id', '=', jobId)
    .where('outcome', '=', 'running')
    .execute();
  return job;
}

/** Cancels a queued or processing job; returns the row, or undefined when it had already finished (or `scope` may not see it). */
export async function cancelJob(trx: Tx, jobId: string, scope?: Scope): Promise<JobRow | undefined> {
  let q = trx
    .updateTable('jobs')
    .set({ status: 'canceled', progress: null, finished_at: sql`now()`, updated_at: sql`now()`, error: null })
    .where('id', '=', jobId)
    .where('status', 'in', ACTIVE);
  if (scope && !scope.all) q = q.where('owner_id', '=', scope.ownerId);
  return q.returningAll().executeTakeFirst();
}

/** Records a provider's progress on the attempt that owns the job; returns the row when it changed. */
export async function setProgress(db: Database | Tx, jobId: string, number: number, progress: number): Promise<JobRow | undefined> {
  return db
    .updateTable('jobs')
    .set({ progress, updated_at: sql`now()` })
    .where('id', '=', jobId)
    .where('status', '=', 'processing')
    .where('attempts', '=', number)
    .returningAll()
    .executeTakeFirst();
}

/** 1 + the queued jobs that run before this one (higher priority, then older), or undefined if not queued. */
export async function queuePosition(db: Database, job: Pick<JobRow, 'id' | 'status' | 'priority' | 'created_at'>): Promise<number | undefined> {
  if (job.status !== 'queued') return undefined;
  const { ahead } = await db
    .selectFrom('jobs')
    .select((eb) => eb.fn.countAll<number>().as('ahead'))
    .where('status', '=', 'queued')
    .where((eb) =>
      eb.or([
        eb('priority', '>', job.priority),
        eb.and([eb('priority', '=', job.priority), eb(eb.refTuple('created_at', 'id'), '<', eb.tuple(job.created_at, job.id))]),
      ]),
    )
    .executeTakeFirstOrThrow();
  return Number(ahead) + 1;
}

export interface JobFilter {
  /** Only this owner's jobs (unset: everyone's, for operators). */
  ownerId?: string;
  statuses?: JobState[];
  createdAfter?: Date;
  createdBefore?: Date;
  /** Continue after this job (the last of the previous page). */
  after?: { createdAt: Date; id: string };
  limit: number;
}

/** Jobs newest first (created_at, then id, descending), filtered; keyset pagination. */
export async function listJobs(db: Database, filter: JobFilter): Promise<JobRow[]> {
  let q = db.selectFrom('jobs').selectAll();
  if (filter.ownerId) q = q.where('owner_id', '=', filter.ownerId);
  if (filter.statuses?.length) q = q.where('status', 'in', filter.statuses);
  if (filter.createdAfter) q = q.where('created_at', '>', filter.createdAfter);
  if (filter.createdBefore) q = q.where('created_at', '<', filter.createdBefore);
  if (filter.after) {
    const { createdAt, id } = filter.after;
    q = q.where((eb) => eb(eb.refTuple('created_at', 'id'), '<', eb.tuple(createdAt, id)));
  }
  return q.orderBy('created_at', 'desc').orderBy('id', 'desc').limit(filter.limit).execute();
}

/** Status changes of a job after event `afterSeq`, oldest first (what an SSE client missed). */
export async function listJobEvents(db: Database, jobId: string, afterSeq: number) {
  return db.selectFrom('job_events').selectAll().where('job_id', '=', jobId).where('seq', '>', afterSeq).orderBy('seq').execute();
}

/** Forgets idempotency keys older than the retention; returns how many were forgotten. */
export async function expireIdempotencyKeys(db: Database, olderThanHours: number): Promise<number> {
  const res = await db
    .updateTable('jobs')
    .set({ idempotency_key: null })
    .where('idempotency_key', 'is not', null)
    .where('created_at', '<', sql<Date>`now() - make_interval(hours => ${olderThanHours})`)
    .executeTakeFirst();
  return Number(res.numUpdatedRows);
}

/** What decides whether a stored file is still wanted: the job's status, attempt and output paths. */
export async function findFileOwners(db: Database, jobIds: string[]): Promise<Pick<JobRow, 'id' | 'status' | 'attempts' | 'outputs'>[]> {
  if (jobIds.length === 0) return [];
  return db.selectFrom('jobs').select(['id', 'status', 'attempts', 'outputs']).where('id', 'in', jobIds).execute();
}

const FINISHED: JobState[] = ['completed', 'failed', 'canceled'];
const STATUSES: JobState[] = [...ACTIVE, ...FINISHED];

/** Jobs by status, from the counters the jobs table's triggers keep (reads a few rows, whatever the history). */
export async function countJobsByStatus(db: Database): Promise<Record<JobState, number>> {
  const rows = await db
    .selectFrom('job_status_counts')
    .select(['status', (eb) => eb.fn.sum<string>('n').as('n')])
    .groupBy('status')
    .execute();
  const counts = Object.fromEntries(STATUSES.map((s) => [s, 0])) as Record<JobState, number>;
  for (const row of rows) if (row.status in counts) counts[row.status as JobState] = Number(row.n);
  return counts;
}

/**
 * Folds the counter rows of database connections that are gone into one row, so the counters table
 * stays as small as the number of live connections. Returns how many rows it folded.
 */
export async function foldJobCounts(db: Database): Promise<number> {
  const { rows } = await sql<{ folded: number }>`
    with gone as (
      delete from job_status_counts
       where backend_pid <> 0 and backend_pid not in (select pid from pg_stat_activity where pid is not null)
       returning status, n
    ), folded as (
      insert into job_status_counts as c (backend_pid, status, n)
      select 0, status, sum(n) from gone group by status
      on conflict (backend_pid, status) do update set n = c.n + excluded.n
    )
    select count(*)::int as folded from gone`.execute(db);
  return rows[0]?.folded ?? 0;
}

/** A job retention deleted, with what it had stored. */
export type RetiredJob = Pick<JobRow, 'id' | 'outputs'>;

/**
 * Deletes up to `limit` jobs that finished more than `olderThanDays` days ago, oldest first, with
 * their attempts, events and webhook deliveries (by cascade), in one transaction; returns them so their
 * files can go too. A job whose Idempotency-Key is still remembered stays until the key expires; rows
 * another transaction holds are skipped.
 */
export async function deleteFinishedJobs(db: Database, olderThanDays: number, limit: number): Promise<RetiredJob[]> {
  return db
    .deleteFrom('jobs')
    .where('id', 'in', (eb) =>
      eb
        .selectFrom('jobs')
        .select('id')
        .where('status', 'in', FINISHED)
        .where('finished_at', '<', sql<Date>`now() - make_interval(days => ${olderThanDays})`)
        .where('idempotency_key', 'is', null)
        .orderBy('finished_at')
        .limit(limit)
        .forUpdate()
        .skipLocked(),
    )
    .returning(['id', 'outputs'])
    .execute();
}
