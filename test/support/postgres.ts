// The Postgres server for a test or benchmark run, chosen in this order: TEST_DATABASE_URL; a
// Testcontainers container when a container runtime answers; else an embedded Postgres in a temp dir.
import { chmodSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import pg from 'pg';
import { PgBoss } from 'pg-boss';
import { parseConfig } from '../../src/config.ts';
import { startEmbeddedPostgres } from '../../src/db/embedded-postgres.ts';
import { migrate } from '../../src/db/migrate.ts';
import { ensureQueues } from '../../src/queue/queue.ts';
import { freePort } from '../../scripts/free-port.ts';

export interface TestPostgres {
  /** URL of the server's maintenance database (`postgres`). */
  adminUrl: string;
  kind: 'url' | 'testcontainers' | 'embedded';
  stop(): Promise<void>;
}

export const TEMPLATE_DB = 'media_test_template';
/** Every test database is named with this prefix (and dropped after the run on a server we were given). */
export const TEST_DB_PREFIX = 'media_test_db_';

/** Drops the template and the test databases: on TEST_DATABASE_URL's server nothing of ours is left. */
export async function dropTestDatabases(adminUrl: string): Promise<void> {
  await withClient(adminUrl, async (c) => {
    const { rows } = await c.query<{ datname: string }>('select datname from pg_database where datname like $1 or datname = $2', [`${TEST_DB_PREFIX}%`, TEMPLATE_DB]);
    for (const { datname } of rows) await c.query(`DROP DATABASE IF EXISTS "${datname}" WITH (FORCE)`);
  });
}

export async function startTestPostgres(): Promise<TestPostgres> {
  if (process.env.TEST_DATABASE_URL) {
    return { adminUrl: process.env.TEST_DATABASE_URL, kind: 'url', stop: async () => {} };
  }
  const container = await startContainer();
  if (container) return container;

  const dir = mkdtempSync(path.join(tmpdir(), 'media-test-pg-'));
  chmodSync(dir, 0o755); // as root, Postgres runs as another user that must reach the data dir
  const server = await startEmbeddedPostgres({
    dataDir: path.join(dir, 'data'),
    port: await freePort(),
    // Test data need not survive a power cut; many test files connect at once.
    flags: ['-c', 'fsync=off', '-c', 'synchronous_commit=off', '-c', 'full_page_writes=off', '-c', 'max_connections=500'],
  });
  return {
    adminUrl: server.url,
    kind: 'embedded',
    stop: async () => {
      await server.stop();
      rmSync(dir, { recursive: true, force: true });
    },
  };
}

async function startContainer(): Promise<TestPostgres | undefined> {
  try {
    const { getContainerRuntimeClient, GenericContainer, Wait } = await import('testcontainers');
    await getContainerRuntimeClient();
    const container = await new GenericContainer('postgres:18-alpine')
      .withEnvironment({ POSTGRES_PASSWORD: 'postgres' })
      .withCommand(['postgres', '-c', 'fsync=off', '-c', 'max_connections=500'])
      .withExposedPorts(5432)
      .withWaitStrategy(Wait.forLogMessage(/database system is ready to accept connections/, 2))
      .start();
    const url = `postgres://postgres:postgres@${container.getHost()}:${container.getMappedPort(5432)}/postgres`;
    return { adminUrl: url, kind: 'testcontainers', stop: async () => void (await container.stop()) };
  } catch {
    return undefined; // no container runtime here (fails in milliseconds)
  }
}

export function databaseUrl(adminUrl: string, database: string): string {
  const url = new URL(adminUrl);
  url.pathname = `/${database}`;
  return url.toString();
}

/** Creates the migrated template (tables + pg-boss schema and queues) that each test database copies. */
export async function createTemplate(adminUrl: string): Promise<void> {
  await withClient(adminUrl, async (c) => {
    await c.query(`DROP DATABASE IF EXISTS ${TEMPLATE_DB} WITH (FORCE)`);
    await c.query(`CREATE DATABASE ${TEMPLATE_DB}`);
  });
  const url = databaseUrl(adminUrl, TEMPLATE_DB);
  await migrate(url);
  const boss = new PgBoss({ connectionString: url, max: 2, supervise: false, schedule: false });
  await boss.start();
  await ensureQueues(boss, parseConfig({}));
  await boss.stop({ graceful: false });
}

/** A fresh database copied from the template; returns its URL. */
export async function createDatabaseFromTemplate(adminUrl: string, name: string): Promise<string> {
  await withClient(adminUrl, async (c) => {
    for (let tries = 0; ; tries++) {
      try {
        await c.query(`CREATE DATABASE ${name} TEMPLATE ${TEMPLATE_DB}`);
        return;
      } catch (err) {
        // Two files copying the template at the same instant: Postgres refuses one; try again.
        if (tries > 20 || !/is being accessed by other users/.test((err as Error).message)) throw err;
        await new Promise((r) => setTimeout(r, 100 + Math.random() * 200));
      }
    }
  });
  return databaseUrl(adminUrl, name);
}

export async function withClient<T>(url: string, fn: (c: pg.Client) => Promise<T>): Promise<T> {
  const client = new pg.Client({ connectionString: url });
  await client.connect();
  try {
    return await fn(client);
  } finally {
    await client.end();
  }
}
