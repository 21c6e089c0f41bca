// Applies the node-pg-migrate migrations in ./migrations (the same ones `npm run migrate` applies).
import { fileURLToPath } from 'node:url';
import { runner } from 'node-pg-migrate';
import type { Logger } from '../logger.ts';

export const migrationsDir = fileURLToPath(new URL('../../migrations', import.meta.url));

export async function migrate(databaseUrl: string, logger?: Logger): Promise<void> {
  const applied = await runner({
    databaseUrl,
    dir: migrationsDir,
    migrationsTable: 'pgmigrations',
    direction: 'up',
    checkOrder: true,
    log: (msg) => logger?.debug({ msg }, 'migration'),
  });
  if (applied.length > 0) logger?.info({ migrations: applied.map((m) => m.name) }, 'migrations applied');
}
