// `npm start`: API and worker in one process. Without DATABASE_URL it runs an embedded Postgres whose
// data lives under DATA_DIR (.data/), kept across restarts.
import path from 'node:path';
import { startEmbeddedPostgres } from './db/embedded-postgres.ts';
import { runProcess } from './main-process.ts';

await runProcess({
  role: 'all',
  async database(config, logger) {
    if (config.DATABASE_URL) return { url: config.DATABASE_URL };
    const port = Number(process.env.EMBEDDED_PG_PORT ?? 54329);
    const pg = await startEmbeddedPostgres({ dataDir: path.join(config.DATA_DIR, 'postgres'), port, logger });
    logger.info({ port, dataDir: config.DATA_DIR }, 'embedded Postgres running (set DATABASE_URL to use your own)');
    return { url: pg.url, release: () => pg.stop() };
  },
});
