// `npm start`: API and worker in one process. Without DATABASE_URL it runs an embedded Postgres whose
// data lives under DATA_DIR (.data/), kept across restarts; one process per DATA_DIR.
import path from 'node:path';
import { DataDirInUseError, lockDataDir } from './db/data-dir-lock.ts';
import { startEmbeddedPostgres } from './db/embedded-postgres.ts';
import { runProcess, StartupError } from './main-process.ts';

await runProcess({
  role: 'all',
  async database(config, logger) {
    if (config.DATABASE_URL) return { url: config.DATABASE_URL };
    const port = config.EMBEDDED_PG_PORT;
    let lock;
    try {
      lock = lockDataDir(config.DATA_DIR, { port: config.PORT });
    } catch (err) {
      if (!(err instanceof DataDirInUseError)) throw err;
      const theirs = err.owner.port === undefined ? '' : ` and serving on PORT=${err.owner.port}`;
      throw new StartupError(
        `another media-gen-service (pid ${err.owner.pid}) is running with DATA_DIR=${config.DATA_DIR}${theirs}. ` +
          `Stop it first, or give this one its own data folder and ports, e.g. DATA_DIR=.data-2 PORT=${config.PORT + 1} EMBEDDED_PG_PORT=${port + 1} npm start`,
      );
    }
    try {
      const pg = await startEmbeddedPostgres({ dataDir: path.join(config.DATA_DIR, 'postgres'), port, logger });
      logger.info({ port, dataDir: config.DATA_DIR }, 'embedded Postgres running (set DATABASE_URL to use your own)');
      return {
        url: pg.url,
        release: async () => {
          await pg.stop();
          lock.release();
        },
      };
    } catch (err) {
      lock.release();
      throw new StartupError(`${(err as Error).message} Set EMBEDDED_PG_PORT to a free port (now ${port}).`);
    }
  },
});
