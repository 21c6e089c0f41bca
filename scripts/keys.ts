// API keys from the command line: `npm run keys -- create --name NAME [--operator] [--max-priority N]`,
// `npm run keys -- list`, `npm run keys -- revoke <id or prefix>`. A new key is printed once; only its
// hash is stored. Uses DATABASE_URL, else the embedded Postgres of `npm start` (started if not running).
import path from 'node:path';
import { parseArgs } from 'node:util';
import pg from 'pg';
import { findApiKeys, insertApiKey, listApiKeys, revokeApiKey, type ApiKeySummary } from '../src/auth/api-key.repository.ts';
import { generateApiKey } from '../src/auth/principal.ts';
import { ConfigError, loadConfig, type Config } from '../src/config.ts';
import { createDatabase, createPool, type Database } from '../src/db/database.ts';
import { startEmbeddedPostgres } from '../src/db/embedded-postgres.ts';
import { migrate } from '../src/db/migrate.ts';

const USAGE = `usage:
  npm run keys -- create --name NAME [--operator] [--max-priority N]
  npm run keys -- list
  npm run keys -- revoke <key id, or the key's start as list shows it>`;

function fail(message: string): never {
  console.error(message);
  process.exit(2);
}

const { positionals, values } = (() => {
  try {
    return parseArgs({
      allowPositionals: true,
      options: {
        name: { type: 'string' },
        operator: { type: 'boolean', default: false },
        'max-priority': { type: 'string' },
        help: { type: 'boolean', short: 'h' },
      },
    });
  } catch (err) {
    return fail(`${(err as Error).message}\n${USAGE}`);
  }
})();
const [command, ...rest] = positionals;
if (values.help || !command) fail(USAGE);

let config: Config;
try {
  config = loadConfig();
} catch (err) {
  if (err instanceof ConfigError) fail(err.message);
  throw err;
}

/** DATABASE_URL; else the embedded server of `npm start`: the running one, or started for this command. */
async function openDatabase(): Promise<{ url: string; release: () => Promise<void> }> {
  if (config.DATABASE_URL) return { url: config.DATABASE_URL, release: async () => {} };
  const port = Number(process.env.EMBEDDED_PG_PORT ?? 54329);
  const url = `postgres://postgres:postgres@127.0.0.1:${port}/postgres`;
  const probe = new pg.Client({ connectionString: url });
  try {
    await probe.connect();
    await probe.end();
    return { url, release: async () => {} };
  } catch {
    const server = await startEmbeddedPostgres({ dataDir: path.join(config.DATA_DIR, 'postgres'), port });
    await migrate(server.url);
    return { url: server.url, release: () => server.stop() };
  }
}

function show(key: ApiKeySummary): string {
  const flags = [
    key.operator ? 'operator' : '',
    key.max_priority !== null ? `max-priority ${key.max_priority}` : '',
    key.revoked_at ? `REVOKED ${key.revoked_at.toISOString()}` : '',
  ]
    .filter(Boolean)
    .join(', ');
  return `${key.id}  ${key.prefix}…  ${key.name}  (created ${key.created_at.toISOString()}${flags ? `; ${flags}` : ''})`;
}

async function run(db: Database): Promise<void> {
  if (command === 'create') {
    const name = values.name?.trim();
    if (!name) fail(`create needs --name NAME\n${USAGE}`);
    let maxPriority: number | undefined;
    if (values['max-priority'] !== undefined) {
      maxPriority = Number(values['max-priority']);
      if (!Number.isInteger(maxPriority) || maxPriority < 0 || maxPriority > 100) fail('--max-priority must be an integer 0-100');
    }
    const material = generateApiKey();
    const key = await insertApiKey(db, { name, prefix: material.prefix, hash: material.hash, operator: values.operator, maxPriority });
    console.error(`created ${show(key)}`);
    console.error('the key (shown once, store it now):');
    console.log(material.key);
  } else if (command === 'list') {
    const keys = await listApiKeys(db);
    if (keys.length === 0) console.error('no keys yet: npm run keys -- create --name NAME');
    for (const key of keys) console.log(show(key));
  } else if (command === 'revoke') {
    const [given] = rest;
    if (!given) fail(`revoke needs a key id or prefix\n${USAGE}`);
    const found = await findApiKeys(db, given);
    if (found.length === 0) fail(`no key matches ${given}`);
    if (found.length > 1) fail(`${given} matches ${found.length} keys; give more of it, or the id:\n${found.map(show).join('\n')}`);
    const revoked = await revokeApiKey(db, found[0].id);
    console.log(`revoked ${show(revoked!)}`);
    console.error('API processes stop accepting it within a few seconds (they cache keys briefly).');
  } else {
    fail(`unknown command ${command}\n${USAGE}`);
  }
}

const { url, release } = await openDatabase();
const pool = createPool({ connectionString: url, max: 1, applicationName: 'media-gen:keys' });
const db = createDatabase(pool);
try {
  await run(db);
} finally {
  await db.destroy();
  await release();
}
