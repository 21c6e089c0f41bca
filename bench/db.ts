// Database side of the bench: bulk enqueueing (ours and bare pg-boss), progress and timing queries.
import { randomUUID } from 'node:crypto';
import pg from 'pg';
import { PgBoss, type JobInsert } from 'pg-boss';
import { LOCAL_PRINCIPAL_ID } from '../src/auth/principal.ts';
import { parseConfig } from '../src/config.ts';
import { GENERATE, GENERATE_DEAD, generatePolicy } from '../src/queue/queue.ts';

export interface BenchDb {
  url: string;
  pool: pg.Pool;
  boss: PgBoss;
  close(): Promise<void>;
}

/** A pool and a pg-boss client (no supervision, no schedules) on one bench database. */
export async function openBenchDb(url: string): Promise<BenchDb> {
  const pool = new pg.Pool({ connectionString: url, max: 4, application_name: 'bench:driver' });
  pool.on('error', () => {});
  const boss = new PgBoss({ connectionString: url, max: 4, supervise: false, schedule: false, migrate: false, application_name: 'bench:driver' });
  boss.on('error', () => {});
  await boss.start();
  return {
    url,
    pool,
    boss,
    async close() {
      await boss.stop({ graceful: false }).catch(() => {});
      await pool.end().catch(() => {});
    },
  };
}

const adapter = (client: pg.PoolClient) => ({
  executeSql: async (text: string, values?: unknown[]) => ({ rows: (await client.query(text, values)).rows }),
});

async function inTransaction(pool: pg.Pool, fn: (c: pg.PoolClient) => Promise<void>): Promise<void> {
  const client = await pool.connect();
  try {
    await client.query('BEGIN');
    await fn(client);
    await client.query('COMMIT');
  } catch (err) {
    await client.query('ROLLBACK').catch(() => {});
    throw err;
  } finally {
    client.release();
  }
}

export interface ImageSpec {
  width: number;
  height: number;
  format: 'png' | 'webp' | 'jpeg';
}

/**
 * What a bulk submit would do: per batch, one transaction inserting the job rows and their pg-boss jobs
 * (same id, same per-job policy as enqueueGenerate). Returns the ids.
 */
export async function enqueueOurs(db: BenchDb, count: number, image: ImageSpec, batch = 500, prompt = (n: number) => `bench image ${n}`): Promise<string[]> {
  const policy = generatePolicy(parseConfig({}));
  const parameters = JSON.stringify({ width: image.width, height: image.height, output_format: image.format, num_outputs: 1 });
  const ids: string[] = [];
  for (let done = 0; done < count; done += batch) {
    const chunk = Array.from({ length: Math.min(batch, count - done) }, (_, i) => ({ id: randomUUID(), n: done + i }));
    await inTransaction(db.pool, async (c) => {
      await c.query(
        `INSERT INTO jobs (id, owner_id, prompt, parameters, provider)
         SELECT id, $4, prompt, $3::jsonb, 'local' FROM unnest($1::uuid[], $2::text[]) AS t(id, prompt)`,
        [chunk.map((j) => j.id), chunk.map((j) => prompt(j.n)), parameters, LOCAL_PRINCIPAL_ID],
      );
      const jobs: JobInsert[] = chunk.map((j) => ({ id: j.id, data: { jobId: j.id }, priority: 0, ...policy, deadLetter: GENERATE_DEAD }));
      await db.boss.insert(GENERATE, jobs, { db: adapter(c) });
    });
    ids.push(...chunk.map((j) => j.id));
  }
  return ids;
}

/** The baseline's jobs: the same pg-boss inserts (same payload and policy) on a queue of its own. */
export async function enqueueBare(db: BenchDb, queue: string, count: number, batch = 500): Promise<void> {
  const policy = generatePolicy(parseConfig({}));
  for (let done = 0; done < count; done += batch) {
    const jobs: JobInsert[] = Array.from({ length: Math.min(batch, count - done) }, () => {
      const id = randomUUID();
      return { id, data: { jobId: id }, priority: 0, ...policy };
    });
    await inTransaction(db.pool, async (c) => void (await db.boss.insert(queue, jobs, { db: adapter(c) })));
  }
}

/** Our jobs not yet finished, and the failed ones. */
export async function ourProgress(db: BenchDb): Promise<{ pending: number; failed: number; completed: number }> {
  const { rows } = await db.pool.query<{ pending: number; failed: number; completed: number }>(
    `SELECT count(*) FILTER (WHERE status IN ('queued', 'processing'))::int AS pending,
            count(*) FILTER (WHERE status = 'failed')::int AS failed,
            count(*) FILTER (WHERE status = 'completed')::int AS completed
       FROM jobs`,
  );
  return rows[0];
}

export async function bareProgress(db: BenchDb, queue: string): Promise<{ pending: number; completed: number }> {
  const { rows } = await db.pool.query<{ pending: number; completed: number }>(
    `SELECT count(*) FILTER (WHERE state < 'completed')::int AS pending,
            count(*) FILTER (WHERE state = 'completed')::int AS completed
       FROM pgboss.job WHERE name = $1`,
    [queue],
  );
  return rows[0];
}

/** Seconds from the first fetch of the generate queue to the last job row completed. */
export async function ourSpanSeconds(db: BenchDb): Promise<number> {
  const { rows } = await db.pool.query<{ s: number }>(
    `SELECT extract(epoch FROM (SELECT max(finished_at) FROM jobs WHERE status = 'completed')
                            - (SELECT min(started_on) FROM pgboss.job WHERE name = $1))::float8 AS s`,
    [GENERATE],
  );
  return rows[0].s;
}

/** Seconds from the first fetch to the last completion of a bare queue. */
export async function bareSpanSeconds(db: BenchDb, queue: string): Promise<number> {
  const { rows } = await db.pool.query<{ s: number }>(
    `SELECT extract(epoch FROM max(completed_on) - min(started_on))::float8 AS s FROM pgboss.job WHERE name = $1 AND state = 'completed'`,
    [queue],
  );
  return rows[0].s;
}
