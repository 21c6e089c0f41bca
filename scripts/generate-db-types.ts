// Generates src/db/types.ts with kysely-codegen from a fresh database migrated from ./migrations.
// `--check` fails (exit 1) when the committed file is stale.
import { execFileSync } from 'node:child_process';
import { chmodSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { startEmbeddedPostgres } from '../src/db/embedded-postgres.ts';
import { migrate } from '../src/db/migrate.ts';
import { freePort } from './free-port.ts';

const check = process.argv.includes('--check');
const dir = mkdtempSync(path.join(tmpdir(), 'codegen-pg-'));
chmodSync(dir, 0o755); // as root, Postgres runs as another user that must reach the data dir
const pg = await startEmbeddedPostgres({ dataDir: path.join(dir, 'data'), port: await freePort() });
let status = 0;
try {
  await migrate(pg.url);
  const args = [
    'kysely-codegen',
    '--dialect',
    'postgres',
    '--url',
    pg.url,
    '--out-file',
    'src/db/types.ts',
    '--exclude-pattern',
    'pgmigrations',
    '--default-schema',
    'public',
  ];
  if (check) args.push('--verify');
  execFileSync('npx', args, { stdio: 'inherit' });
} catch (err) {
  console.error(check ? 'src/db/types.ts is stale: run `npm run generate:db`' : err);
  status = 1;
} finally {
  await pg.stop();
  rmSync(dir, { recursive: true, force: true });
}
process.exit(status);
