// One-shot: apply the migrations and create the queues, then exit (the compose `migrate` service).
import { loadConfig } from './config.ts';
import { migrate } from './db/migrate.ts';
import { createLogger } from './logger.ts';
import { createBoss, ensureQueues } from './queue/queue.ts';

const config = loadConfig();
const logger = createLogger(config.LOG_LEVEL, { role: 'migrate' });
if (!config.DATABASE_URL) {
  logger.fatal('DATABASE_URL is required');
  process.exit(78);
}
try {
  await migrate(config.DATABASE_DIRECT_URL ?? config.DATABASE_URL, logger); // a session of its own (PgBouncer)
  const boss = createBoss(config.DATABASE_URL, 2, config, logger);
  await boss.start();
  await ensureQueues(boss, config);
  await boss.stop({ graceful: false });
  logger.info('database is up to date');
} catch (err) {
  logger.fatal({ err }, 'migration failed');
  process.exit(1);
}
