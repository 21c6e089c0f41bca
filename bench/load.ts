// Child process: the load generator of the submit scenario, so load never shares a process (or an
// event loop) with what it measures. Parameters come as JSON in BENCH_LOAD; the result goes back over
// IPC as {type:'result', ...}.
//   kind 'http': POST /generate on 127.0.0.1. Without a rate: autocannon, closed loop, as fast as the
//                connections go. With a rate: an open-loop generator that sends at evenly spaced
//                moments (autocannon's rate limit fires each second's budget in a burst) and times
//                each request from the moment it was due, so queueing in the client counts too.
//   kind 'pg':   the baseline: the same two INSERTs the API runs per submission (the jobs row, and the
//                pg-boss job with exactly the SQL and payload pg-boss's send() produces), one
//                transaction each, straight through `pg`, at the same concurrency over a pool of the
//                same size as the API's.
import { randomUUID } from 'node:crypto';
import http from 'node:http';
import autocannon from 'autocannon';
import pg from 'pg';
import { PgBoss } from 'pg-boss';
import { parseConfig } from '../src/config.ts';
import { LOCAL_PRINCIPAL_ID } from '../src/auth/principal.ts';
import { createDatabase } from '../src/db/database.ts';
import { GENERATE, GENERATE_DEAD, generatePolicy } from '../src/queue/queue.ts';
import { nowMs, percentile } from './common.ts';

export interface LoadSpec {
  kind: 'http' | 'pg';
  /** http: base URL (loopback only); pg: database URL. */
  target: string;
  connections: number;
  durationSeconds: number;
  /** A run of this length first, in the same process, whose figures are dropped. */
  warmupSeconds?: number;
  /** http only: total requests per second over all connections (unset: as fast as possible). */
  rate?: number;
  /** pg only: pool size (the API's DATABASE_POOL_MAX). */
  poolMax?: number;
  /** http only: extra request headers (e.g. Authorization). */
  headers?: Record<string, string>;
  /** http only, unpaced: connection i also sends headerSets[i % length] (e.g. one API key each). */
  headerSets?: Record<string, string>[];
  /** The request body (same for the pg baseline's row). */
  body: { prompt: string; parameters: { width: number; height: number } };
}

export interface LoadResult {
  type: 'result';
  requests: number;
  errors: number;
  seconds: number;
  perSecond: number;
  p50: number;
  p99: number;
  mean: number;
  /** CPU time of this (load) process per request, ms. */
  cpuMsPerRequest?: number;
}

const send = (m: object) => process.send?.(m);
process.on('disconnect', () => process.exit(1));

function summarize(latencies: number[], errors: number, seconds: number): LoadResult {
  return {
    type: 'result',
    requests: latencies.length,
    errors,
    seconds,
    perSecond: latencies.length / seconds,
    p50: percentile(latencies, 50),
    p99: percentile(latencies, 99),
    mean: latencies.reduce((a, b) => a + b, 0) / Math.max(1, latencies.length),
  };
}

async function paced(spec: LoadSpec, url: URL): Promise<LoadResult> {
  const agent = new http.Agent({ keepAlive: true, maxSockets: spec.connections });
  const payload = JSON.stringify(spec.body);
  const latencies: number[] = [];
  let errors = 0;
  const request = (due: number) =>
    new Promise<void>((resolve) => {
      const req = http.request(
        url,
        {
          method: 'POST',
          agent,
          headers: { 'content-type': 'application/json', 'content-length': Buffer.byteLength(payload), ...spec.headers },
          timeout: 10_000,
        },
        (res) => {
          res.resume();
          res.on('end', () => {
            if (res.statusCode === 202) latencies.push(nowMs() - due);
            else errors++;
            resolve();
          });
        },
      );
      req.on('error', () => {
        errors++;
        resolve();
      });
      req.on('timeout', () => req.destroy(new Error('timeout')));
      req.end(payload);
    });
  const interval = 1000 / spec.rate!;
  const total = Math.round(spec.rate! * spec.durationSeconds);
  const started = nowMs();
  const pending: Promise<void>[] = [];
  let sent = 0;
  while (sent < total) {
    const now = nowMs();
    while (sent < total && started + sent * interval <= now) pending.push(request(started + sent++ * interval));
    await new Promise((r) => setTimeout(r, Math.max(0, Math.min(5, started + sent * interval - nowMs()))));
  }
  await Promise.all(pending);
  agent.destroy();
  return summarize(latencies, errors, (nowMs() - started) / 1000);
}

async function httpLoad(spec: LoadSpec): Promise<LoadResult> {
  const url = new URL('/generate', spec.target);
  if (url.hostname !== '127.0.0.1') throw new Error(`refusing a non-loopback target ${url.hostname}`);
  if (spec.rate) return paced(spec, url);
  const latencies: number[] = [];
  let errors = 0;
  const started = nowMs();
  let connection = 0;
  const instance = autocannon({
    url: url.toString(),
    method: 'POST',
    headers: { 'content-type': 'application/json', ...spec.headers },
    body: JSON.stringify(spec.body),
    ...(spec.headerSets?.length
      ? {
          setupClient: (client: { setHeaders(h: Record<string, string>): void }) =>
            client.setHeaders({ 'content-type': 'application/json', ...spec.headers, ...spec.headerSets![connection++ % spec.headerSets!.length] }),
        }
      : {}),
    connections: spec.connections,
    duration: spec.durationSeconds,
    timeout: 10,
  });
  instance.on('response', (_client: unknown, statusCode: number, _bytes: number, responseTime: number) => {
    if (statusCode === 202) latencies.push(responseTime);
    else errors++;
  });
  const result = await new Promise<{ errors: number; timeouts: number }>((resolve, reject) => {
    instance.on('done', resolve);
    instance.on('error', reject);
  });
  errors += result.errors + result.timeouts;
  return summarize(latencies, errors, (nowMs() - started) / 1000);
}

async function direct(spec: LoadSpec): Promise<LoadResult> {
  const config = parseConfig({});
  // The pg-boss INSERT exactly as send() builds it for the generate queue (see enqueueGenerate).
  const capture: { sql?: string; params?: unknown[] } = {};
  const boss = new PgBoss({ connectionString: spec.target, max: 1, supervise: false, schedule: false, migrate: false });
  await boss.start();
  const templateId = randomUUID();
  await boss.send(
    GENERATE,
    { jobId: templateId },
    {
      ...generatePolicy(config),
      id: templateId,
      priority: 0,
      deadLetter: GENERATE_DEAD,
      db: {
        async executeSql(text: string, values?: unknown[]) {
          capture.sql = text;
          capture.params = values;
          return { rows: [{ id: templateId }] };
        },
      },
    },
  );
  await boss.stop({ graceful: false });
  const [bossJob] = JSON.parse(capture.params![0] as string) as Record<string, unknown>[];

  const pool = new pg.Pool({ connectionString: spec.target, max: spec.poolMax ?? 10, application_name: 'bench:pg-baseline' });
  // The jobs INSERT exactly as Kysely compiles insertJob (src/jobs/job.repository.ts).
  const db = createDatabase(pool);
  const parameters = { width: spec.body.parameters.width, height: spec.body.parameters.height, output_format: 'png', num_outputs: 1 };
  const insertFor = (id: string) =>
    db
      .insertInto('jobs')
      .values({
        id,
        owner_id: LOCAL_PRINCIPAL_ID,
        prompt: spec.body.prompt,
        parameters: JSON.stringify(parameters),
        provider: 'local',
        idempotency_key: null,
        request_hash: null,
      })
      .onConflict((oc) => oc.columns(['owner_id', 'idempotency_key']).where('idempotency_key', 'is not', null).doNothing())
      .returningAll()
      .compile();

  const latencies: number[] = [];
  let errors = 0;
  const started = nowMs();
  const deadline = started + spec.durationSeconds * 1000;
  const loop = async () => {
    while (nowMs() < deadline) {
      const t0 = nowMs();
      const id = randomUUID();
      const jobInsert = insertFor(id);
      const client = await pool.connect();
      try {
        await client.query('BEGIN');
        await client.query(jobInsert.sql, jobInsert.parameters as unknown[]);
        await client.query(capture.sql!, [JSON.stringify([{ ...bossJob, id, data: { jobId: id } }])]);
        await client.query('COMMIT');
        latencies.push(nowMs() - t0);
      } catch {
        errors++;
        await client.query('ROLLBACK').catch(() => {});
      } finally {
        client.release();
      }
    }
  };
  await Promise.all(Array.from({ length: spec.connections }, loop));
  const seconds = (nowMs() - started) / 1000;
  await pool.end();
  return summarize(latencies, errors, seconds);
}

try {
  const spec = JSON.parse(process.env.BENCH_LOAD!) as LoadSpec;
  const run = (s: LoadSpec) => (s.kind === 'http' ? httpLoad(s) : direct(s));
  if (spec.warmupSeconds) await run({ ...spec, durationSeconds: spec.warmupSeconds });
  send({ type: 'measuring' });
  const cpu = process.cpuUsage();
  const result = await run(spec);
  const used = process.cpuUsage(cpu);
  send({ ...result, cpuMsPerRequest: (used.user + used.system) / 1000 / Math.max(1, result.requests) });
  process.exit(0);
} catch (err) {
  send({ type: 'fatal', error: err instanceof Error ? (err.stack ?? err.message) : String(err) });
  process.exit(1);
}
