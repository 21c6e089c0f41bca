// Configuration: `.env.example` documents exactly the variables the schema knows, with the real
// defaults; a bad environment is refused in one error naming every bad variable; and secrets that pass
// through the logger (Replicate token, database password, Authorization header) never reach the output.
import { readFileSync } from 'node:fs';
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import { fileURLToPath } from 'node:url';
import { pino } from 'pino';
import { pinoHttp } from 'pino-http';
import { ConfigError, configKeys, parseConfig } from '../src/config.ts';
import { createLogger, redactUrl, type Logger } from '../src/logger.ts';

const envExamplePath = fileURLToPath(new URL('../.env.example', import.meta.url));

/** `NAME=value` lines of .env.example (commented-out `# NAME=value` lines count too: they document a variable). */
function readEnvExample(): Map<string, string> {
  const vars = new Map<string, string>();
  for (const line of readFileSync(envExamplePath, 'utf8').split('\n')) {
    const m = /^\s*(?:#\s*)?([A-Z][A-Z0-9_]*)=(.*)$/.exec(line);
    if (!m) continue;
    if (vars.has(m[1])) throw new Error(`.env.example lists ${m[1]} twice`);
    vars.set(m[1], m[2].trim());
  }
  return vars;
}

describe('.env.example', () => {
  const documented = readEnvExample();

  test('lists every variable the config schema knows, and nothing else', () => {
    expect(configKeys.length).toBeGreaterThan(10); // the export really is the schema's key list
    const missing = configKeys.filter((k) => !documented.has(k));
    const composeOnly = ['POSTGRES_PASSWORD']; // read by docker-compose.yml, not by the service
    const unknown = [...documented.keys()].filter((k) => !configKeys.includes(k) && !composeOnly.includes(k));
    expect({ missing, unknown }).toEqual({ missing: [], unknown: [] });
  });

  test('the values it shows are the defaults ("Values shown are the defaults")', () => {
    const defaults = parseConfig({});
    const wrong: string[] = [];
    for (const [key, value] of documented) {
      if (!configKeys.includes(key)) continue; // reported by the test above
      if (value === '') {
        // shown empty: the variable has no default (it is unset unless given)
        if (defaults[key as keyof typeof defaults] !== undefined)
          wrong.push(`${key} is shown empty but defaults to ${JSON.stringify(defaults[key as keyof typeof defaults])}`);
        continue;
      }
      const shown = parseConfig({ [key]: value })[key as keyof typeof defaults];
      if (JSON.stringify(shown) !== JSON.stringify(defaults[key as keyof typeof defaults])) {
        wrong.push(`${key}: .env.example shows ${value}, the default is ${JSON.stringify(defaults[key as keyof typeof defaults])}`);
      }
    }
    expect(wrong).toEqual([]);
  });
});

describe('parseConfig', () => {
  test('defaults are as documented', () => {
    const config = parseConfig({});
    expect(config).toMatchObject({
      PORT: 8000,
      HOST: '127.0.0.1',
      JOB_RETRY_LIMIT: 5,
      JOB_RETRY_DELAY_SECONDS: 1,
      JOB_RETRY_DELAY_MAX_SECONDS: 60,
      MAX_BODY_BYTES: 64 * 1024,
      PROVIDER: 'auto',
      RUN_MIGRATIONS: true,
    });
    expect(config.DATABASE_URL).toBeUndefined();
    expect(config.REPLICATE_API_TOKEN).toBeUndefined();
    expect(Object.isFrozen(config)).toBe(true);
  });

  test('an empty variable means unset', () => {
    const config = parseConfig({ PORT: '', DATABASE_URL: '' });
    expect(config.PORT).toBe(8000);
    expect(config.DATABASE_URL).toBeUndefined();
  });

  test('several bad variables: one ConfigError naming every one of them', () => {
    const bad: Record<string, string> = {
      PORT: 'eighty',
      JOB_RETRY_LIMIT: '-1',
      JOB_RETRY_DELAY_MAX_SECONDS: '1.5',
      LOG_LEVEL: 'loud',
      DATABASE_URL: 'mysql://user:hunter2-db-pass@db/app',
      RUN_MIGRATIONS: 'yes',
      MAX_BODY_BYTES: '10',
      PROVIDER: 'openai',
      REPLICATE_MODEL: 'not a model',
    };
    let error: unknown;
    try {
      parseConfig({ ...bad, HOST: '127.0.0.1', JOB_TIMEOUT_SECONDS: '60' });
    } catch (err) {
      error = err;
    }
    expect(error).toBeInstanceOf(ConfigError);
    const message = (error as Error).message;
    const named = (key: string) => new RegExp(`(^|\\s)${key}:`, 'm').test(message);
    expect(Object.keys(bad).filter((k) => !named(k))).toEqual([]);
    // good variables are not blamed
    expect(named('HOST')).toBe(false);
    expect(named('JOB_TIMEOUT_SECONDS')).toBe(false);
    // the message names variables, it does not echo their values (a bad URL may hold a password)
    expect(message).not.toContain('hunter2-db-pass');
  });

  test('a good environment parses to typed values', () => {
    const config = parseConfig({ PORT: '0', RUN_MIGRATIONS: '0', REPLICATE_DOWNLOAD_HOSTS: ' a.example , b.example ,', WORKER_POLL_INTERVAL_SECONDS: '0.5' });
    expect(config).toMatchObject({ PORT: 0, RUN_MIGRATIONS: false, REPLICATE_DOWNLOAD_HOSTS: ['a.example', 'b.example'], WORKER_POLL_INTERVAL_SECONDS: 0.5 });
  });
});

describe('secrets never reach the logs', () => {
  const TOKEN = 'r8_SECRETtokenVALUE0123456789abcdef';
  const DB_PASSWORD = 'pg-pass-S3CRET-9f8e7d';
  const DB_URL = `postgres://media:${DB_PASSWORD}@db.internal:5432/media`;
  const BEARER = 'Bearer client-bearer-S3CRET-4455';
  const secrets = [TOKEN, DB_PASSWORD, BEARER, BEARER.slice('Bearer '.length), encodeURIComponent(DB_PASSWORD)];

  /**
   * The logger createLogger builds, writing into memory instead of stdout. createLogger takes no
   * destination, so the in-memory stream replaces pino's own (the one `write` reads; children share it).
   */
  function memoryLogger(): { logger: Logger; output: () => string } {
    const chunks: string[] = [];
    const logger = createLogger('trace');
    (logger as unknown as Record<symbol, unknown>)[pino.symbols.streamSym] = { write: (s: string) => void chunks.push(s) };
    return { logger, output: () => chunks.join('') };
  }

  function expectNoSecret(output: string) {
    expect(output.length).toBeGreaterThan(0); // something was logged, so the check means something
    for (const secret of secrets) {
      if (output.includes(secret)) throw new Error(`the log output contains the secret ${JSON.stringify(secret)}:\n${output}`);
    }
  }

  test('the memory stream really captures what createLogger writes', () => {
    const { logger, output } = memoryLogger();
    logger.child({ part: 'x' }).info({ harmless: 'visible-value' }, 'hello');
    expect(output()).toContain('visible-value');
  });

  test('the parsed configuration, logged whole or as the environment', () => {
    const { logger, output } = memoryLogger();
    const config = parseConfig({ REPLICATE_API_TOKEN: TOKEN, DATABASE_URL: DB_URL });
    expect(config.REPLICATE_API_TOKEN).toBe(TOKEN);
    logger.info({ config }, 'configuration');
    logger.child({ component: 'startup' }).info({ env: { REPLICATE_API_TOKEN: TOKEN, DATABASE_URL: DB_URL } }, 'environment');
    logger.info({ options: { token: TOKEN, connectionString: DB_URL } }, 'provider and pool options');
    logger.info({ database: redactUrl(DB_URL) }, 'connecting'); // what service.ts logs
    expect(output()).toContain('db.internal'); // the useful part of the URL stays
    expectNoSecret(output());
  });

  // Redaction is by key path: src/logger.ts lists `*.token` etc. (one level down) but not the same keys at
  // the top level, so `logger.info({ token })` printed the token until the top-level paths were added.
  test('secrets at the top level of a logged object', () => {
    const { logger, output } = memoryLogger();
    logger.info({ REPLICATE_API_TOKEN: TOKEN }, 'token');
    logger.info({ DATABASE_URL: DB_URL }, 'database');
    logger.info({ token: TOKEN, password: DB_PASSWORD, authorization: BEARER }, 'credentials');
    expectNoSecret(output());
  });

  test('an incoming request with an Authorization header, logged by pino-http as app.ts does', async () => {
    const { logger, output } = memoryLogger();
    const logRequests = pinoHttp({ logger, customLogLevel: () => 'info' });
    const server = http.createServer((req, res) => {
      logRequests(req, res);
      req.log.info({ headers: req.headers }, 'handling'); // a handler logging the headers it got
      res.end('ok');
    });
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
    try {
      const { port } = server.address() as AddressInfo;
      const res = await fetch(`http://127.0.0.1:${port}/generate`, { headers: { authorization: BEARER, 'x-api-key': 'harmless' } });
      expect(await res.text()).toBe('ok');
      // pino-http logs the request when the response finishes
      const deadline = Date.now() + 5_000;
      while (!output().includes('request completed') && Date.now() < deadline) await new Promise((r) => setImmediate(r));
    } finally {
      await new Promise((resolve) => server.close(resolve));
    }
    expect(output()).toContain('request completed');
    expect(output()).toContain('/generate');
    expectNoSecret(output());
  });
});
