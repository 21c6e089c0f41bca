// Chooses the image provider from configuration.
import type { Config } from '../config.ts';
import type { Database } from '../db/database.ts';
import type { Logger } from '../logger.ts';
import { createLocalProvider } from './local.provider.ts';
import type { ImageProvider } from './provider.ts';
import { createSharedRateLimit } from './rate-limit.ts';
import { createReplicateProvider } from './replicate.provider.ts';

/** The row of the fleet-wide create limit (one Replicate account per deployment). */
export const REPLICATE_CREATE_LIMIT = 'replicate:create';

export function createProvider(config: Config, logger: Logger, db: Database): ImageProvider {
  const useReplicate = config.PROVIDER === 'replicate' || (config.PROVIDER === 'auto' && config.REPLICATE_API_TOKEN !== undefined);
  if (!useReplicate) {
    logger.info({ latencyMs: config.LOCAL_PROVIDER_LATENCY_MS }, 'using the offline local generator (set REPLICATE_API_TOKEN to generate through Replicate)');
    return createLocalProvider({ latencyMs: config.LOCAL_PROVIDER_LATENCY_MS });
  }
  if (config.REPLICATE_API_STYLE === 'replicate' && !config.REPLICATE_API_TOKEN) {
    throw new Error('PROVIDER=replicate needs REPLICATE_API_TOKEN');
  }
  const perMinute = config.REPLICATE_API_STYLE === 'replicate' ? config.REPLICATE_CREATES_PER_MINUTE : undefined;
  logger.info(
    {
      model: config.REPLICATE_MODEL,
      baseUrl: config.REPLICATE_BASE_URL,
      apiStyle: config.REPLICATE_API_STYLE,
      downloadHosts: config.REPLICATE_DOWNLOAD_HOSTS,
      createsPerMinute: perMinute ?? 'unlimited',
      createBurst: perMinute === undefined ? undefined : config.REPLICATE_CREATE_BURST,
    },
    'generating through Replicate',
  );
  return createReplicateProvider({
    token: config.REPLICATE_API_TOKEN,
    baseUrl: config.REPLICATE_BASE_URL,
    model: config.REPLICATE_MODEL,
    apiStyle: config.REPLICATE_API_STYLE,
    waitSeconds: config.REPLICATE_WAIT_SECONDS,
    deadlineMs: config.REPLICATE_DEADLINE_SECONDS * 1000,
    pollIntervalMs: config.REPLICATE_POLL_INTERVAL_MS,
    maxRateLimitWaitMs: config.REPLICATE_MAX_RATE_LIMIT_WAIT_SECONDS * 1000,
    downloadHosts: config.REPLICATE_DOWNLOAD_HOSTS,
    downloadMaxBytes: config.MAX_IMAGE_BYTES,
    downloadTimeoutMs: config.REPLICATE_DOWNLOAD_TIMEOUT_MS,
    logger: logger.child({ provider: 'replicate' }),
    createLimit:
      perMinute === undefined ? undefined : createSharedRateLimit(db, { name: REPLICATE_CREATE_LIMIT, perMinute, burst: config.REPLICATE_CREATE_BURST }),
  });
}
