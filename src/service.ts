// Composition root: builds the parts from Config and wires them; main-*.ts pick which parts run.
import type { Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import type { PgBoss } from 'pg-boss';
import type { Config } from './config.ts';
import { createDatabase, createPool, type Database } from './db/database.ts';
import { migrate } from './db/migrate.ts';
import { createApp } from './http/app.ts';
import { startWorker } from './jobs/job.worker.ts';
import { redactUrl, type Logger } from './logger.ts';
import { createLocalStorage } from './media/storage.ts';
import { createProvider } from './providers/index.ts';
import type { ImageProvider } from './providers/provider.ts';
import { createBoss, ensureQueues } from './queue/queue.ts';

export interface ServiceOptions {
  config: Config;
  databaseUrl: string;
  logger: Logger;
  api: boolean;
  worker: boolean;
  /** Replaces the configured provider (tests inject failing or counting providers). */
  provider?: ImageProvider;
  validateResponses?: boolean;
}

export interface Service {
  db: Database;
  boss: PgBoss;
  provider: ImageProvider;
  /** The port the API listens on (0 when the API is not running). */
  port: number;
  server?: Server;
  /** Graceful stop: stop accepting, let running jobs finish within the grace period, release all. */
  stop(): Promise<void>;
}

export async function startService(options: ServiceOptions): Promise<Service> {
  const { config, logger, databaseUrl } = options;
  const releasers: (() => Promise<void>)[] = [];
  const stop = async () => {
    for (const release of releasers.reverse()) {
      try {
        await release();
      } catch (err) {
        logger.warn({ err }, 'error while stopping');
      }
    }
    releasers.length = 0;
  };

  try {
    logger.info({ database: redactUrl(databaseUrl) }, 'connecting');
    if (config.RUN_MIGRATIONS) await migrate(databaseUrl, logger);

    const pool = createPool({ connectionString: databaseUrl, max: config.DATABASE_POOL_MAX, applicationName: `media-gen:${options.api ? 'api' : 'worker'}` });
    const db = createDatabase(pool);
    releasers.push(() => db.destroy());

    const boss = createBoss(databaseUrl, config.DATABASE_POOL_MAX, config, logger);
    await boss.start();
    releasers.push(() => boss.stop({ graceful: true, timeout: Math.max(1, config.SHUTDOWN_GRACE_SECONDS) * 1000 }));
    await ensureQueues(boss, config);

    const provider = options.provider ?? createProvider(config, logger);
    const storage = await createLocalStorage(config.MEDIA_DIR);

    if (options.worker) {
      await startWorker({ db, boss, provider, storage, config, logger });
      // Stopping pg-boss (below) stops fetching, waits up to the grace period for running jobs, then
      // fails what is left so another worker retries it.
      releasers.push(async () => logger.info({ graceSeconds: config.SHUTDOWN_GRACE_SECONDS }, 'worker draining'));
    }

    let server: Server | undefined;
    if (options.api) {
      const app = createApp({ db, boss, storage, logger, provider: provider.name, queueConfig: config, maxBodyBytes: config.MAX_BODY_BYTES, validateResponses: options.validateResponses });
      server = await new Promise<Server>((resolve, reject) => {
        const s = app.listen(config.PORT, config.HOST, (err?: Error) => (err ? reject(err) : resolve(s)));
      });
      server.requestTimeout = 30_000;
      server.headersTimeout = 10_000;
      const listening = server;
      releasers.push(
        () =>
          new Promise<void>((resolve) => {
            listening.close(() => resolve());
            listening.closeIdleConnections();
          }),
      );
      logger.info({ port: (server.address() as AddressInfo).port, provider: provider.name }, 'API listening');
    }

    return { db, boss, provider, server, port: server ? (server.address() as AddressInfo).port : 0, stop };
  } catch (err) {
    await stop();
    throw err;
  }
}
