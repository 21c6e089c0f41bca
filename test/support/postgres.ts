// The Postgres server for a test or benchmark run, chosen in this order: TEST_DATABASE_URL; a
// Testcontainers container when a container runtime answers; else an embedded Postgres in a temp dir.
// The choice, and why a preferred one was refused, is one line of the run's output.
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
  /** Which server, and why a preferred one was refused: `embedded (Testcontainers: ...)`. */
  description: string;
  /** Hosts other than loopback that tests must reach for this server (test/support/block-network.ts). */
  hosts: string[];
  stop(): Promise<void>;
}

export const CONTAINER_IMAGE = 'postgres:18-alpine';

/** A Postgres container as Testcontainers started it: where it listens, and the runtime's host. */
export interface StartedContainer {
  host: string;
  port: number;
  runtimeHost: string;
  stop(): Promise<void>;
}

export interface TestPostgresOptions {
  env?: NodeJS.ProcessEnv;
  /** Starts the container, or rejects with the reason it cannot (tests pass a fake). */
  startContainer?: () => Promise<StartedContainer>;
}

export const TEMPLATE_DB = 'media_test_template';
/** Every test database is named with this prefix (and dropped after the run on a server we were given). */
export const TEST_DB_PREFIX = 'media_test_db_';

/** Drops the template and the test databases: on TEST_DATABASE_URL's server nothing of ours is left. */
export async function dropTestDatabases(adminUrl: string): Promise<void> {
  await withClient(adminUrl, async (c) => {
    const { rows } = await c.query<{ datname: string }>('select datname from pg_database where datname like $1 or datname = $2', [
      `${TEST_DB_PREFIX}%`,
      TEMPLATE_DB,
    ]);
    for (const { datname } of rows) await c.query(`DROP DATABASE IF EXISTS "${datname}" WITH (FORCE)`);
  });
}

export async function startTestPostgres(options: TestPostgresOptions = {}): Promise<TestPostgres> {
  const env = options.env ?? process.env;
  if (env.TEST_DATABASE_URL) {
    const url = new URL(env.TEST_DATABASE_URL);
    return {
      adminUrl: env.TEST_DATABASE_URL,
      kind: 'url',
      description: `TEST_DATABASE_URL at ${url.host}`,
      hosts: guardHosts([url.hostname]),
      stop: async () => {},
    };
  }
  let refused: string;
  try {
    const c = await (options.startContainer ?? startContainer)();
    return {
      adminUrl: `postgres://postgres:postgres@${c.host.includes(':') ? `[${c.host}]` : c.host}:${c.port}/postgres`,
      kind: 'testcontainers',
      description: `Testcontainers ${CONTAINER_IMAGE} at ${c.host}:${c.port}`,
      hosts: guardHosts([c.host, c.runtimeHost]),
      stop: () => c.stop(),
    };
  } catch (err) {
    refused = containerRefusal(err, env);
  }

  const dir = mkdtempSync(path.join(tmpdir(), 'media-test-pg-'));
  chmodSync(dir, 0o755); // as root, Postgres runs as another user that must reach the data dir
  try {
    const server = await startEmbeddedPostgres({
      dataDir: path.join(dir, 'data'),
      port: await freePort(),
      // Test data need not survive a power cut; many test files connect at once.
      flags: ['-c', 'fsync=off', '-c', 'synchronous_commit=off', '-c', 'full_page_writes=off', '-c', 'max_connections=500'],
    });
    return {
      adminUrl: server.url,
      kind: 'embedded',
      description: `embedded (Testcontainers: ${refused})`,
      hosts: [],
      stop: async () => {
        await server.stop();
        rmSync(dir, { recursive: true, force: true });
      },
    };
  } catch (err) {
    rmSync(dir, { recursive: true, force: true });
    throw new Error(`no test Postgres: Testcontainers: ${refused}; embedded: ${(err as Error).message}`, { cause: err });
  }
}

async function startContainer(): Promise<StartedContainer> {
  const { getContainerRuntimeClient, GenericContainer, Wait } = await import('testcontainers');
  const runtime = await getContainerRuntimeClient();
  const container = await new GenericContainer(CONTAINER_IMAGE)
    .withEnvironment({ POSTGRES_PASSWORD: 'postgres' })
    .withCommand(['postgres', '-c', 'fsync=off', '-c', 'max_connections=500'])
    .withExposedPorts(5432)
    .withWaitStrategy(Wait.forLogMessage(/database system is ready to accept connections/, 2))
    .start();
  return {
    host: container.getHost(),
    port: container.getMappedPort(5432),
    runtimeHost: runtime.info.containerRuntime.host,
    stop: async () => void (await container.stop()),
  };
}

/** Why the Testcontainers path was refused, in one line (Testcontainers' errors can span many). */
export function containerRefusal(err: unknown, env: NodeJS.ProcessEnv = process.env): string {
  const message = err instanceof Error ? err.message : String(err);
  // Testcontainers tries DOCKER_HOST, then the usual sockets, and says only this when none answers.
  if (message.includes('Could not find a working container runtime strategy')) {
    return `no container runtime answered at ${env.DOCKER_HOST ?? 'unix:///var/run/docker.sock'}`;
  }
  const line =
    message
      .split('\n')
      .map((l) => l.trim())
      .find(Boolean) ?? 'failed without a message';
  return `${CONTAINER_IMAGE} did not start: ${line}`;
}

/** Hosts as the network guard compares them: lower case, IPv6 without brackets, each once. */
const guardHosts = (hosts: string[]) => [...new Set(hosts.filter(Boolean).map((h) => h.toLowerCase().replace(/^\[(.*)\]$/, '$1')))];

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
