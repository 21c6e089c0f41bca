// Chooses the image provider from configuration.
import type { Config } from '../config.ts';
import type { Logger } from '../logger.ts';
import { createLocalProvider } from './local.provider.ts';
import type { ImageProvider } from './provider.ts';

export function createProvider(config: Config, logger: Logger): ImageProvider {
  const wantsReplicate = config.PROVIDER === 'replicate' || (config.PROVIDER === 'auto' && config.REPLICATE_API_TOKEN);
  if (wantsReplicate) {
    throw new Error('the replicate provider is not wired yet');
  }
  logger.info({ latencyMs: config.LOCAL_PROVIDER_LATENCY_MS }, 'using the offline local generator (set REPLICATE_API_TOKEN to generate through Replicate)');
  return createLocalProvider({ latencyMs: config.LOCAL_PROVIDER_LATENCY_MS });
}
