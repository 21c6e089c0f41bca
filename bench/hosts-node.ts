// Child process of the several-hosts scenario (bench/hosts.ts), started inside a network namespace with
// `ip netns exec`; talks to the bench over IPC only. HOSTS_ROLE:
//   postgres: an embedded Postgres listening on the namespace's address (password auth from the
//             scenario's private range), until told to stop.
//   driver:   the client host: creates databases and an API key, submits jobs to the API over the
//             namespaces' network, and reads progress, throughput and the exactly-once checks from the
//             database.
import { randomUUID } from 'node:crypto';
import { existsSync, readdirSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import pg from 'pg';
import { insertApiKey } from '../src/auth/api-key.repository.ts';
import { generateApiKey } from '../src/auth/principal.ts';
import { createDatabase, createPool } from '../src/db/database.ts';
import { startEmbeddedPostgres, type EmbeddedPostgres } from '../src/db/embedded-postgres.ts';
import { body } from './scenarios.ts';

type Message = Record<string, unknown> & { cmd: string; id: number };
const send = (m: Record<string, unknown>) => process.send?.(m);
const role = process.env.HOSTS_ROLE;
let server: EmbeddedPostgres | undefined;

async function query<T extends pg.QueryResultRow>(url: string, text: string, values: unknown[] = []): Promise<T[]> {
  const client = new pg.Client({ connectionString: url, application_name: 'bench:hosts-driver' });
  await client.connect();
  try {
    return (await client.query<T>(text, values)).rows;
  } finally {
    await client.end();
  }
}

const dbUrl = (admin: string, name: string) => {
  const u = new URL(admin);
  u.pathname = `/${name}`;
  return u.toString();
};

/** POSTs `count` jobs to the API with `concurrency` requests in flight; returns how many were accepted. */
async function submit(api: string, key: string, count: number, concurrency: number): Promise<{ accepted: number; errors: string[]; seconds: number }> {
  const t0 = Date.now();
  let next = 0;
  let accepted = 0;
  const errors: string[] = [];
  await Promise.all(
    Array.from({ length: concurrency }, async () => {
      while (next < count) {
        next++;
        try {
          const res = await fetch(`${api}/generate`, {
            method: 'POST',
            headers: { 'content-type': 'application/json', authorization: `Bearer ${key}` },
            body: JSON.stringify(body),
          });
          if (res.status === 202) accepted++;
          else errors.push(`${res.status} ${await res.text()}`);
        } catch (err) {
          errors.push(String(err));
        }
      }
    }),
  );
  return { accepted, errors: errors.slice(0, 5), seconds: (Date.now() - t0) / 1000 };
}

/** Every job completed exactly once: one succeeded attempt, its outputs, one finished queue entry, the files. */
async function verify(url: string, mediaDir: string) {
  const [row] = await query<Record<string, number>>(
    url,
    `select (select count(*)::int from jobs) as jobs,
            (select count(*)::int from jobs where status = 'completed') as completed,
            (select count(*)::int from jobs j where (select count(*) from job_attempts a where a.job_id = j.id and a.outcome = 'succeeded') <> 1) as "notOneSuccess",
            (select count(*)::int from jobs where jsonb_array_length(outputs) <> 1) as "notOneOutput",
            (select count(*)::int from jobs j join job_attempts a on a.job_id = j.id and a.outcome = 'succeeded'
               where j.attempts <> a.number or j.outputs->0->>'url' not like '/media/' || j.id || '-' || a.number || '-%') as "outputNotOfWinner",
            (select count(distinct job_id)::int from job_attempts where outcome = 'interrupted') as recovered,
            (select count(*)::int from job_attempts) as attempts,
            (select count(*)::int from pgboss.job where name = 'generate' and state = 'completed') as "queueCompleted"`,
  );
  const outputs = await query<{ url: string; thumb: string }>(
    url,
    `select outputs->0->>'url' as url, outputs->0->>'thumbnail_url' as thumb from jobs where status = 'completed'`,
  );
  const referenced = new Set(
    outputs
      .flatMap((o) => [o.url, o.thumb])
      .filter(Boolean)
      .map((u) => path.basename(u)),
  );
  const missingFiles = [...referenced].filter((name) => !existsSync(path.join(mediaDir, name))).length;
  const strayFiles = readdirSync(mediaDir).filter((name) => !referenced.has(name) && !name.startsWith('.')).length;
  return { ...row, missingFiles, strayFiles };
}

process.on('disconnect', () => void stop(1));
process.on('SIGTERM', () => void stop(0));

async function stop(code: number): Promise<never> {
  await server?.stop().catch(() => {});
  process.exit(code);
}

process.on('message', (m: Message) => {
  const reply = (body: Record<string, unknown>) => send({ type: 'reply', id: m.id, ...body });
  const handle = async (): Promise<Record<string, unknown>> => {
    const admin = process.env.HOSTS_ADMIN_URL!;
    switch (m.cmd) {
      case 'createDatabase': {
        const name = String(m.name);
        await query(admin, `DROP DATABASE IF EXISTS ${name} WITH (FORCE)`);
        await query(admin, `CREATE DATABASE ${name}`);
        return { url: dbUrl(admin, name) };
      }
      case 'createKey': {
        const db = createDatabase(createPool({ connectionString: String(m.url), max: 1, applicationName: 'bench:hosts-driver' }));
        try {
          const material = generateApiKey();
          await insertApiKey(db, { name: `hosts-${randomUUID().slice(0, 8)}`, prefix: material.prefix, hash: material.hash, operator: true });
          return { key: material.key };
        } finally {
          await db.destroy();
        }
      }
      case 'submit':
        return submit(String(m.api), String(m.key), Number(m.count), Number(m.concurrency));
      case 'progress': {
        const [row] = await query<{ pending: number; completed: number; failed: number }>(
          String(m.url),
          `select count(*) filter (where status in ('queued', 'processing'))::int as pending, count(*) filter (where status = 'completed')::int as completed,
                  count(*) filter (where status in ('failed', 'canceled'))::int as failed from jobs`,
        );
        return row;
      }
      case 'throughput': {
        // Each worker host's completions over its own span (its first attempt's start to its last
        // completion, database clock), summed: hosts that start a second apart are not penalised.
        const rows = await query<{ n: number; seconds: number }>(
          String(m.url),
          `select count(*)::int as n, extract(epoch from max(finished_at) - min(started_at))::float8 as seconds
             from job_attempts where outcome = 'succeeded' group by worker`,
        );
        const [all] = await query<{ n: number; seconds: number }>(
          String(m.url),
          `select count(*)::int as n, extract(epoch from max(finished_at) - min(started_at))::float8 as seconds from jobs where status = 'completed'`,
        );
        return { jobs: all.n, seconds: all.seconds, perSecond: rows.reduce((sum, r) => sum + r.n / r.seconds, 0), hosts: rows.length };
      }
      case 'verify':
        return verify(String(m.url), String(m.mediaDir));
      case 'stop':
        void stop(0);
        return {};
      default:
        throw new Error(`unknown command ${m.cmd}`);
    }
  };
  handle().then(reply, (err: unknown) => reply({ error: err instanceof Error ? err.message : String(err) }));
});

try {
  if (role === 'postgres') {
    const dir = process.env.HOSTS_PG_DIR!;
    // Password auth from the scenario's range, trust on this namespace's loopback (embedded-postgres' own checks).
    const hba = path.join(dir, 'pg_hba.conf');
    writeFileSync(hba, `local all all trust\nhost all all 127.0.0.1/32 trust\nhost all all ${process.env.HOSTS_RANGE} scram-sha-256\n`, { mode: 0o644 });
    server = await startEmbeddedPostgres({
      dataDir: path.join(dir, 'data'),
      port: Number(process.env.HOSTS_PG_PORT),
      flags: [
        '-c',
        'listen_addresses=*',
        '-c',
        `hba_file=${hba}`,
        '-c',
        'max_connections=300',
        '-c',
        'fsync=off',
        '-c',
        'synchronous_commit=off',
        '-c',
        'full_page_writes=off',
      ],
    });
  }
  send({ type: 'ready', pid: process.pid });
} catch (err) {
  send({ type: 'fatal', error: err instanceof Error ? (err.stack ?? err.message) : String(err) });
  await stop(1);
}
