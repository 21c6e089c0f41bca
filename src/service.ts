// Composition root: builds the parts from Config and wires them; main-*.ts pick which parts run.
import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import type { PgBoss } from 'pg-boss';
import type { Config } from './config.ts';
import { createDatabase, createPool, type Database } from './db/database.ts';
import { migrate } from './db/migrate.ts';
import { createJobEventHub } from './jobs/job.events.ts';
import { redactUrl, type Logger } from './logger.ts';
import { createStorage } from './media/storage.ts';
import { createMetrics, registerDatabaseGauges, type Metrics } from './metrics.ts';
import { createProvider } from './providers/index.ts';
import type { ImageProvider } from './providers/provider.ts';
import { createBoss, ensureQueues } from './queue/queue.ts';
import { startWorker, type Worker } from './worker/worker.ts';

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
  metrics: Metrics;
  /** The worker, when this process runs one. */
  worker?: Worker;
  /** The port the API listens on (0 when the API is not running). */
  port: number;
  server?: Server;
  /** Graceful stop: stop accepting, let running jobs finish within the grace period, release all. */
  stop(): Promise<void>;
}

export async function startService(options: ServiceOptions): Promise<Service> {
  const { config, logger, databaseUrl } = options;
  // Released in reverse order of acquisition.
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
    // Migrations (a session-level lock) and LISTEN need a session of their own: behind PgBouncer in
    // transaction mode, DATABASE_DIRECT_URL reaches Postgres directly.
    const directUrl = config.DATABASE_DIRECT_URL ?? databaseUrl;
    if (config.RUN_MIGRATIONS) await migrate(directUrl, logger);

    const role = options.api && options.worker ? 'all' : options.api ? 'api' : 'worker';
    const pool = createPool({ connectionString: databaseUrl, max: config.DATABASE_POOL_MAX, applicationName: `media-gen:${role}` });
    const db = createDatabase(pool);
    releasers.push(() => db.destroy());

    const events = await createJobEventHub(directUrl, logger);
    releasers.push(() => events.close());

    const boss = createBoss(databaseUrl, config.DATABASE_POOL_MAX, config, logger);
    await boss.start();
    // The worker drains first (see below); by then pg-boss has nothing running to wait for.
    releasers.push(() => boss.stop({ graceful: false }));
    await ensureQueues(boss, config);

    const metrics = createMetrics();
    registerDatabaseGauges(metrics, db, boss);
    const provider = options.provider ?? createProvider(config, logger, db);
    const storage = await createStorage(config, logger);
    releasers.push(() => storage.close());

    let worker: Worker | undefined;
    if (options.worker) {
      const started = await startWorker({ db, boss, provider, storage, config, logger, events, metrics });
      releasers.push(() => started.stop());
      worker = started;
    }

    let server: Server | undefined;
    if (options.api) {
      // Loaded only where the API runs: a worker-only process saves the HTTP stack's memory (~40 MB).
      const { createApp } = await import('./http/app.ts');
      const app = createApp({
        db,
        boss,
        storage,
        logger,
        events,
        metrics,
        provider: provider.name,
        queueConfig: config,
        webhookConfig: config,
        security: config,
        maxBodyBytes: config.MAX_BODY_BYTES,
        corsOrigins: config.CORS_ORIGINS,
        validateResponses: options.validateResponses,
      });
      const { answerClientError, answerConnect, answerExpectation } = await import('./http/problem.ts');
      server = createServer(app.express);
      // Requests Node's HTTP parser refuses get problem+json too, not a bare 400 or a dropped socket.
      server.on('clientError', answerClientError);
      server.on('connect', answerConnect);
      server.on('checkExpectation', answerExpectation);
      await listen(server, config.PORT, config.HOST);
      server.requestTimeout = 30_000;
      server.headersTimeout = 10_000;
      releasers.push(closer(server, () => app.closeStreams()));
      logger.info({ port: (server.address() as AddressInfo).port, provider: provider.name }, 'API listening');
    } else if (config.METRICS_PORT !== undefined) {
      // A worker-only process serves its own metrics (its histograms live in this process).
      const metricsServer = createServer((req, res) => {
        if (req.url !== '/metrics') return void res.writeHead(404).end();
        // A scrape the database cannot answer (its gauges query it) is a 503, never a crash.
        metrics.registry.metrics().then(
          (text) => res.writeHead(200, { 'content-type': metrics.registry.contentType }).end(text),
          (err: unknown) => {
            logger.warn({ err }, 'metrics scrape failed');
            res.writeHead(503, { 'content-type': 'text/plain' }).end('metrics unavailable: the database is not reachable\n');
          },
        );
      });
      await listen(metricsServer, config.METRICS_PORT, config.HOST);
      releasers.push(closer(metricsServer, () => {}));
      logger.info({ port: (metricsServer.address() as AddressInfo).port }, 'worker metrics listening');
    }

    return { db, boss, provider, metrics, worker, server, port: server ? (server.address() as AddressInfo).port : 0, stop };
  } catch (err) {
    await stop();
    throw err;
  }
}

function listen(server: Server, port: number, host: string): Promise<Server> {
  return new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(port, host, () => {
      server.off('error', reject);
      resolve(server);
    });
  });
}

function closer(server: Server, endStreams: () => void): () => Promise<void> {
  return () =>
    new Promise<void>((resolve) => {
      server.close(() => resolve());
      endStreams();
      server.closeIdleConnections();
    });
}
