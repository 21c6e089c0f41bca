// Runs a Service as a process: logging, signals (first drains, second forces), exit codes.
import { ConfigError, loadConfig, type Config } from './config.ts';
import { createLogger, type Logger } from './logger.ts';
import type { ImageProvider } from './providers/provider.ts';
import { startService, type Service } from './service.ts';

export interface ProcessOptions {
  role: 'all' | 'api' | 'worker';
  /** Resolves the database URL (main.ts may start an embedded Postgres) and what to release after. */
  database: (config: Config, logger: Logger) => Promise<{ url: string; release?: () => Promise<void> }>;
  /** Replaces the configured provider (test processes count calls with it). */
  provider?: (config: Config, databaseUrl: string) => ImageProvider;
}

/** A refusal to start whose message says it all: logged without a stack trace. */
export class StartupError extends Error {}

export async function runProcess(options: ProcessOptions): Promise<void> {
  let config: Config;
  try {
    config = loadConfig();
  } catch (err) {
    if (err instanceof ConfigError) {
      console.error(err.message);
      process.exit(78); // EX_CONFIG
    }
    throw err;
  }
  const logger = await processLogger(config, options.role);
  let service: Service | undefined;
  let release: (() => Promise<void>) | undefined;
  let stopping = false;

  const shutdown = async (signal: string) => {
    if (stopping) {
      logger.warn({ signal }, 'second signal: stopping now; running jobs will be retried by another worker');
      process.exit(130);
    }
    stopping = true;
    logger.info({ signal }, 'stopping (send the signal again to stop at once)');
    await service?.stop();
    await release?.();
    logger.info('stopped');
    process.exit(0);
  };
  process.on('SIGTERM', () => void shutdown('SIGTERM'));
  process.on('SIGINT', () => void shutdown('SIGINT'));

  try {
    const db = await options.database(config, logger);
    release = db.release;
    service = await startService({
      config,
      logger,
      databaseUrl: db.url,
      api: options.role !== 'worker',
      worker: options.role !== 'api',
      provider: options.provider?.(config, db.url),
    });
    if (service.server) {
      logger.info({ port: service.port }, `media-gen-service listening on http://${hostForHumans(config.HOST)}:${service.port} (the page: /, API docs: /docs)`);
    } else {
      logger.info('media-gen-service worker running');
    }
  } catch (err) {
    if (err instanceof StartupError) logger.fatal(err.message);
    else if ((err as NodeJS.ErrnoException).code === 'EADDRINUSE') {
      logger.fatal(
        `PORT ${config.PORT} is already in use on ${config.HOST}: stop what listens there, or choose another port, e.g. PORT=${config.PORT + 1} npm start`,
      );
    } else logger.fatal({ err }, 'failed to start');
    await release?.();
    process.exit(1);
  }
}

/** JSON lines for machines; in a terminal (and not in production), the same logs as readable lines. */
async function processLogger(config: Config, role: string): Promise<Logger> {
  if (process.stdout.isTTY && config.NODE_ENV !== 'production') {
    try {
      const { default: pretty } = await import('pino-pretty'); // a devDependency: absent from the image
      return createLogger(config.LOG_LEVEL, { role }, pretty({ sync: true, translateTime: 'SYS:HH:MM:ss', ignore: 'pid,hostname,role' }));
    } catch {
      // fall through to JSON
    }
  }
  return createLogger(config.LOG_LEVEL, { role });
}

function hostForHumans(host: string): string {
  if (['0.0.0.0', '::', '127.0.0.1', '::1', 'localhost'].includes(host)) return 'localhost';
  return host.includes(':') ? `[${host}]` : host;
}

export function requireDatabaseUrl(config: Config): { url: string } {
  if (!config.DATABASE_URL) {
    console.error('DATABASE_URL is required for this entrypoint (npm start runs an embedded Postgres instead)');
    process.exit(78);
  }
  return { url: config.DATABASE_URL };
}
