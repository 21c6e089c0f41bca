// Starts the real service (API and/or worker) on a database of its own, on an ephemeral port.
import { randomBytes } from 'node:crypto';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { insertApiKey } from '../../src/auth/api-key.repository.ts';
import { generateApiKey } from '../../src/auth/principal.ts';
import { parseConfig, type Config } from '../../src/config.ts';
import { createDatabase, createPool } from '../../src/db/database.ts';
import { createLogger } from '../../src/logger.ts';
import type { ImageProvider } from '../../src/providers/provider.ts';
import { startService, type Service } from '../../src/service.ts';
import { createDatabaseFromTemplate, TEST_DB_PREFIX } from './postgres.ts';

export function adminUrl(): string {
  const url = process.env.TEST_PG_ADMIN_URL;
  if (!url) throw new Error('TEST_PG_ADMIN_URL is not set: run the tests with `npm test`');
  return url;
}

/** A fresh database, copied from the migrated template. */
export async function createTestDatabase(): Promise<string> {
  return createDatabaseFromTemplate(adminUrl(), `${TEST_DB_PREFIX}${randomBytes(6).toString('hex')}`);
}

/** Settings for tests: quiet, loopback, ephemeral port, a temp media dir, fast polling and retries. */
export function testConfig(overrides: Record<string, string> = {}): Config {
  return parseConfig({
    NODE_ENV: 'test',
    PORT: '0',
    HOST: '127.0.0.1',
    LOG_LEVEL: process.env.TEST_LOG_LEVEL ?? 'silent',
    MEDIA_DIR: mkdtempSync(path.join(tmpdir(), 'media-test-')),
    RUN_MIGRATIONS: 'false',
    DATABASE_POOL_MAX: '5',
    WORKER_POLL_INTERVAL_SECONDS: '0.5',
    WORKER_SUPERVISE_INTERVAL_SECONDS: '1',
    JOB_RETRY_DELAY_SECONDS: '1',
    SHUTDOWN_GRACE_SECONDS: '5',
    ...overrides,
  });
}

export interface TestService extends Service {
  config: Config;
  databaseUrl: string;
  baseUrl: string;
}

export interface StartOptions {
  databaseUrl?: string;
  api?: boolean;
  worker?: boolean;
  provider?: ImageProvider;
  env?: Record<string, string>;
}

export async function startTestService(options: StartOptions = {}): Promise<TestService> {
  const databaseUrl = options.databaseUrl ?? (await createTestDatabase());
  const config = testConfig(options.env);
  const service = await startService({
    config,
    databaseUrl,
    logger: createLogger(config.LOG_LEVEL),
    api: options.api ?? true,
    worker: options.worker ?? true,
    provider: options.provider,
    validateResponses: true,
  });
  return {
    ...service,
    config,
    databaseUrl,
    baseUrl: `http://127.0.0.1:${service.port}`,
    stop: async () => {
      await service.stop();
      rmSync(config.MEDIA_DIR, { recursive: true, force: true });
    },
  };
}

/** Polls `fn` until it returns a value other than undefined, or fails after `timeoutMs`. */
export async function waitFor<T>(fn: () => Promise<T | undefined>, what: string, timeoutMs = 20_000, intervalMs = 25): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  let last: unknown;
  for (;;) {
    try {
      const value = await fn();
      if (value !== undefined) return value;
    } catch (err) {
      last = err;
    }
    if (Date.now() > deadline)
      throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}${last ? `: ${last instanceof Error ? last.message : JSON.stringify(last)}` : ''}`);
    await new Promise((r) => setTimeout(r, intervalMs));
  }
}

export interface StatusBody {
  job_id: string;
  status: string;
  result_url?: string;
  error?: string;
  attempts: number;
  outputs: { url: string; width: number; height: number; format: string; bytes: number; thumbnail_url?: string }[];
  [key: string]: unknown;
}

/** Polls GET /status/{id} until the job reaches one of `statuses`. */
export async function waitForStatus(
  baseUrl: string,
  id: string,
  statuses: string[] = ['completed', 'failed', 'canceled'],
  timeoutMs = 30_000,
  headers: Record<string, string> = {},
): Promise<StatusBody> {
  return waitFor(
    async () => {
      const res = await fetch(`${baseUrl}/status/${id}`, { headers });
      const body = (await res.json()) as StatusBody;
      return statuses.includes(body.status) ? body : undefined;
    },
    `job ${id} to reach ${statuses.join('|')}`,
    timeoutMs,
  );
}

export async function submit(baseUrl: string, body: unknown, headers: Record<string, string> = {}): Promise<Response> {
  return fetch(`${baseUrl}/generate`, {
    method: 'POST',
    headers: { 'content-type': 'application/json', ...headers },
    body: typeof body === 'string' ? body : JSON.stringify(body),
  });
}

/** Creates an API key in the database (as `npm run keys -- create` does) and returns it. */
export async function createApiKey(databaseUrl: string, options: { name?: string; operator?: boolean; maxPriority?: number } = {}): Promise<string> {
  const db = createDatabase(createPool({ connectionString: databaseUrl, max: 1, applicationName: 'test:keys' }));
  try {
    const material = generateApiKey();
    await insertApiKey(db, {
      name: options.name ?? 'test',
      prefix: material.prefix,
      hash: material.hash,
      operator: options.operator ?? false,
      maxPriority: options.maxPriority,
    });
    return material.key;
  } finally {
    await db.destroy();
  }
}

/** The request headers that authenticate as `key`. */
export function bearer(key: string): Record<string, string> {
  return { authorization: `Bearer ${key}` };
}
