// A typed client of this service, generated from openapi.yaml (openapi-typescript types + openapi-fetch).
//   import { createMediaClient } from 'media-gen-service/client';
//   const api = createMediaClient('http://localhost:8000');
//   const { data, error } = await api.POST('/generate', { body: { prompt: 'A lighthouse' } });
import createClient, { type ClientOptions } from 'openapi-fetch';
import type { components, paths } from '../http/api-types.ts';

export type { components, paths };
export type JobStatus = components['schemas']['JobStatus'];
export type JobEvent = components['schemas']['JobEvent'];
export type Problem = components['schemas']['Problem'];

export function createMediaClient(baseUrl: string, options: Omit<ClientOptions, 'baseUrl'> = {}) {
  return createClient<paths>({ baseUrl, ...options });
}

export type MediaClient = ReturnType<typeof createMediaClient>;
