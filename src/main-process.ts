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
  const logger = createLogger(config.LOG_LEVEL, { role: options.role });
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
  } catch (err) {
    logger.fatal({ err }, 'failed to start');
    await release?.();
    process.exit(1);
  }
}

export function requireDatabaseUrl(config: Config): { url: string } {
  if (!config.DATABASE_URL) {
    console.error('DATABASE_URL is required for this entrypoint (npm start runs an embedded Postgres instead)');
    process.exit(78);
  }
  return { url: config.DATABASE_URL };
}
