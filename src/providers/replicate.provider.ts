// The Replicate image provider: runs a model on Replicate's HTTP API (or on a self-hosted Cog server
// speaking Cog's HTTP API), waits for it, and brings its output images home.
//
// Replicate flow: POST the prediction with `Prefer: wait=<n>` (short predictions finish in that one
// round trip), else poll `urls.get` until a terminal status; then download the outputs (allow-listed
// hosts only, size-capped, magic-byte checked). The overall deadline, the caller's AbortSignal and
// rate limits are handled here; 5xx/network retries are got's own retry machinery.
import { randomBytes } from 'node:crypto';
import { setTimeout as sleep } from 'node:timers/promises';
import got, { HTTPError, RequestError, TimeoutError, type RetryObject, type RetryOptions } from 'got';
import type { Logger } from 'pino';
import {
  ProviderError,
  type GeneratedImage,
  type GenerationHooks,
  type GenerationRequest,
  type GenerationResult,
  type ImageProvider,
  type ProviderErrorKind,
} from './provider.ts';
import { RateLimitBookedError, type RateLimit } from './rate-limit.ts';

export type ReplicateApiStyle = 'replicate' | 'cog';

export interface ReplicateProviderOptions {
  /** Replicate API token (sent as `Authorization: Bearer …`). Required for apiStyle 'replicate'; optional for 'cog'. */
  token?: string;
  /** `https://api.replicate.com/v1` for Replicate; the server root (e.g. `http://gpu-box:5000`) for Cog. */
  baseUrl: string;
  /** `owner/name` (official model) or `owner/name:<64-hex version>`. Not used by 'cog' (one model per server). */
  model: string;
  /** Default 'replicate'. */
  apiStyle?: ReplicateApiStyle;
  /** `Prefer: wait=<n>`, 1–60 seconds (clamped; also never beyond the remaining deadline). */
  waitSeconds: number;
  /** Overall time for one generate() call; past it the prediction is canceled and a retryable error thrown. */
  deadlineMs: number;
  /** Pause between polls of a prediction that is not finished yet. */
  pollIntervalMs: number;
  /** The longest single wait a 429 may ask for and still be waited out here; longer → retryable error. */
  maxRateLimitWaitMs: number;
  /**
   * Where output files may be downloaded from. An entry is either
   *  - a host name (`replicate.delivery`): https only, that host and all its subdomains;
   *  - `*.host`: https only, subdomains of host only;
   *  - an origin with a scheme (`http://127.0.0.1:4010`): exactly that scheme, host and port. This is the
   *    only way to allow plain http (meant for loopback test servers and self-hosted Cog file stores).
   */
  downloadHosts: readonly string[];
  /** Largest output file accepted (Content-Length or bytes received, and decoded data: URIs). */
  downloadMaxBytes: number;
  /** Timeout of one output download. */
  downloadTimeoutMs: number;
  /** Retries of a request that failed with 5xx or a network error (got's retry; default 3). */
  maxRetries?: number;
  /** First backoff of those retries; doubles each time (default 500 ms). */
  retryBackoffMs?: number;
  /** Cap of that backoff (default 10 s). */
  retryBackoffLimitMs?: number;
  /** Timeout of the best-effort cancel request (default 3 s). */
  cancelTimeoutMs?: number;
  /** Debug logging of requests (method, url, status, prediction id). The token is never logged. */
  logger?: Logger;
  /**
   * A limit on prediction creates shared by the fleet (src/providers/rate-limit.ts): a token is taken
   * before every create (a create retried after a 429 included), waiting for it within the deadline.
   */
  createLimit?: RateLimit;
}

// ---------------------------------------------------------------------------------------------------
// Input mapping

/** The aspect ratios black-forest-labs/flux-schnell accepts. */
export const FLUX_ASPECT_RATIOS = ['1:1', '16:9', '21:9', '3:2', '2:3', '4:5', '5:4', '3:4', '4:3', '9:16', '9:21'] as const;
export type FluxAspectRatio = (typeof FLUX_ASPECT_RATIOS)[number];

/**
 * At or below this area (pixels) flux-schnell is asked for its 0.25 MP size, above it for 1 MP.
 * 512×512 plus 20 %: a slight upscale (≤ 1.1× per side) by the worker is invisible, and 0.25 MP runs faster.
 */
export const QUARTER_MEGAPIXEL_MAX_AREA = Math.round(512 * 512 * 1.2);

/** The supported ratio closest to width/height (compared on a log scale, so 2:1 and 1:2 are equally far from 1:1). */
export function closestAspectRatio(width: number, height: number, ratios: readonly string[] = FLUX_ASPECT_RATIOS): string {
  const target = Math.log(width / height);
  let best = ratios[0];
  let bestDistance = Infinity;
  for (const ratio of ratios) {
    const [w, h] = ratio.split(':').map(Number);
    const distance = Math.abs(Math.log(w / h) - target);
    if (distance < bestDistance) {
      best = ratio;
      bestDistance = distance;
    }
  }
  return best;
}

export function chooseMegapixels(width: number, height: number): '1' | '0.25' {
  return width * height <= QUARTER_MEGAPIXEL_MAX_AREA ? '0.25' : '1';
}

/** Our 'jpeg' is flux's 'jpg'; png and webp are spelled the same. */
export function toModelOutputFormat(format: GenerationRequest['outputFormat']): 'png' | 'webp' | 'jpg' {
  return format === 'jpeg' ? 'jpg' : format;
}

/**
 * The inputs of black-forest-labs/flux-schnell (and models with the same schema) for a request.
 * flux-schnell takes no width/height: the closest aspect ratio and megapixels are asked for, and the
 * worker resizes the result to the exact size afterwards.
 */
export function toReplicateInput(request: GenerationRequest): Record<string, unknown> {
  const input: Record<string, unknown> = {
    prompt: request.prompt,
    aspect_ratio: closestAspectRatio(request.width, request.height),
    megapixels: chooseMegapixels(request.width, request.height),
    num_outputs: request.numOutputs,
    output_format: toModelOutputFormat(request.outputFormat),
  };
  if (request.seed !== undefined) input.seed = request.seed;
  return input;
}

/**
 * The inputs sent to a self-hosted Cog model. A model one serves oneself typically takes width and
 * height, so they are passed as asked (no aspect-ratio approximation); the format is spelled as flux
 * spells it ('jpg').
 */
export function toCogInput(request: GenerationRequest): Record<string, unknown> {
  const input: Record<string, unknown> = {
    prompt: request.prompt,
    width: request.width,
    height: request.height,
    num_outputs: request.numOutputs,
    output_format: toModelOutputFormat(request.outputFormat),
  };
  if (request.seed !== undefined) input.seed = request.seed;
  return input;
}

// ---------------------------------------------------------------------------------------------------
// Small pure helpers (exported for unit tests)

/** The last tqdm percentage in a model's logs (`  45%|████▌     | 9/20 [...]`), as a fraction; undefined if none. */
export function parseProgress(logs: unknown): number | undefined {
  if (typeof logs !== 'string' || logs === '') return undefined;
  const matches = [...logs.matchAll(/(\d{1,3})%\s*\|/g)];
  const last = matches.at(-1);
  if (!last) return undefined;
  const percent = Number(last[1]);
  return percent > 100 ? undefined : percent / 100;
}

/** The image type from the first bytes (PNG, JPEG, WebP, GIF, AVIF), or undefined. */
export function sniffImageType(data: Uint8Array): string | undefined {
  const b = Buffer.from(data.buffer, data.byteOffset, data.byteLength);
  if (b.length >= 8 && b.subarray(0, 8).equals(Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]))) return 'image/png';
  if (b.length >= 3 && b[0] === 0xff && b[1] === 0xd8 && b[2] === 0xff) return 'image/jpeg';
  if (b.length >= 12 && b.toString('latin1', 0, 4) === 'RIFF' && b.toString('latin1', 8, 12) === 'WEBP') return 'image/webp';
  if (b.length >= 6 && /^GIF8[79]a$/.test(b.toString('latin1', 0, 6))) return 'image/gif';
  if (b.length >= 16 && b.toString('latin1', 4, 8) === 'ftyp') {
    const boxSize = Math.min(b.readUInt32BE(0), b.length);
    const brands = [b.toString('latin1', 8, 12)];
    for (let at = 16; at + 4 <= boxSize; at += 4) brands.push(b.toString('latin1', at, at + 4));
    if (brands.includes('avif') || brands.includes('avis')) return 'image/avif';
  }
  return undefined;
}

/** Whether `url` may be downloaded from, per the allow-list described on `downloadHosts`. */
export function isAllowedDownloadUrl(url: URL, allowed: readonly string[]): boolean {
  if (url.username || url.password) return false;
  const host = url.hostname.toLowerCase();
  for (const raw of allowed) {
    const entry = raw.trim().toLowerCase();
    if (entry === '') continue;
    if (entry.includes('://')) {
      let origin: URL;
      try {
        origin = new URL(entry);
      } catch {
        continue;
      }
      if (origin.origin === url.origin) return true;
      continue;
    }
    if (url.protocol !== 'https:') continue;
    if (entry.startsWith('*.')) {
      if (host.endsWith(entry.slice(1))) return true;
    } else if (host === entry || host.endsWith(`.${entry}`)) {
      return true;
    }
  }
  return false;
}

/** The decoded bytes of a `data:` URI, refusing (before decoding) anything above maxBytes. */
export function decodeDataUri(uri: string, maxBytes: number): { data: Buffer; mediaType: string } {
  const comma = uri.indexOf(',');
  if (!uri.startsWith('data:') || comma < 0) throw new Error('malformed data: URI');
  const meta = uri.slice(5, comma);
  const payload = uri.slice(comma + 1);
  const isBase64 = /;base64$/i.test(meta);
  const mediaType = (isBase64 ? meta.slice(0, -7) : meta).split(';')[0] || 'text/plain';
  const estimate = isBase64 ? Math.floor((payload.length * 3) / 4) : payload.length;
  // A base64 estimate can be 2 bytes high (padding); allow for it, then check exactly.
  if (estimate > maxBytes + 2) throw new TooLargeError(maxBytes);
  const data = isBase64 ? Buffer.from(payload, 'base64') : percentDecode(payload);
  if (data.length > maxBytes) throw new TooLargeError(maxBytes);
  return { data, mediaType };
}

function percentDecode(text: string): Buffer {
  const bytes: number[] = [];
  for (let i = 0; i < text.length; i++) {
    const c = text.charCodeAt(i);
    if (c === 0x25 && /^[0-9a-f]{2}$/i.test(text.slice(i + 1, i + 3))) {
      bytes.push(parseInt(text.slice(i + 1, i + 3), 16));
      i += 2;
    } else {
      bytes.push(...Buffer.from(text[i], 'utf8'));
    }
  }
  return Buffer.from(bytes);
}

class TooLargeError extends Error {
  constructor(maxBytes: number) {
    super(`larger than the ${maxBytes}-byte limit`);
  }
}

/**
 * Whether a failed prediction's error is about the request itself (input or content policy), so that
 * running it again is pointless. Anything else (CUDA OOM, internal errors, timeouts) is worth a retry.
 */
export function isPermanentPredictionError(message: string): boolean {
  return /nsfw|not safe for work|safety|content[\s_-]*polic|moderat|flagged|sensitive content|invalid input|input validation|validation error|prompt (?:is )?too long/i.test(
    message,
  );
}

const TERMINAL_STATUSES = new Set(['succeeded', 'failed', 'canceled', 'aborted']);

// ---------------------------------------------------------------------------------------------------
// Wire types

interface Prediction {
  id?: string;
  status?: string;
  output?: unknown;
  error?: unknown;
  logs?: string | null;
  metrics?: { predict_time?: number; total_time?: number } | null;
  urls?: { get?: string; cancel?: string; stream?: string; web?: string };
}

const VERSIONED_MODEL = /^([\w.-]+)\/([\w.-]+):([0-9a-f]{64})$/;
const OFFICIAL_MODEL = /^([\w.-]+)\/([\w.-]+)$/;

/** Network errors that happen before a request reached the server: retrying a non-idempotent POST is safe. */
const NOT_SENT_ERROR_CODES = ['ECONNREFUSED', 'ENOTFOUND', 'EAI_AGAIN', 'ENETUNREACH', 'EADDRINUSE', 'EHOSTUNREACH'];
const NETWORK_ERROR_CODES = [...NOT_SENT_ERROR_CODES, 'ETIMEDOUT', 'ECONNRESET', 'EPIPE'];
const TRANSIENT_STATUS_CODES = [408, 429, 500, 502, 503, 504, 521, 522, 524];

/** The request failed (or was interrupted) because the caller's signal or the deadline fired. */
class Interrupted extends Error {}

// ---------------------------------------------------------------------------------------------------
// The provider

export function createReplicateProvider(options: ReplicateProviderOptions): ImageProvider {
  const apiStyle = options.apiStyle ?? 'replicate';
  const baseUrl = options.baseUrl.replace(/\/+$/, '');
  const apiOrigin = new URL(baseUrl).origin;
  const maxRetries = options.maxRetries ?? 3;
  const backoffMs = options.retryBackoffMs ?? 500;
  const backoffLimitMs = options.retryBackoffLimitMs ?? 10_000;
  const cancelTimeoutMs = options.cancelTimeoutMs ?? 3_000;
  const log = options.logger;

  if (apiStyle === 'replicate' && !options.token) throw new Error('Replicate provider: a token is required');
  let modelPath: { owner: string; name: string; version?: string };
  {
    const versioned = VERSIONED_MODEL.exec(options.model);
    const official = OFFICIAL_MODEL.exec(options.model);
    if (versioned) modelPath = { owner: versioned[1], name: versioned[2], version: versioned[3] };
    else if (official) modelPath = { owner: official[1], name: official[2] };
    else if (apiStyle === 'cog') modelPath = { owner: '', name: '' };
    else throw new Error(`Replicate provider: model must be owner/name or owner/name:<64-hex version>, got ${JSON.stringify(options.model)}`);
  }

  // The API client. Redirects are not followed: nothing in the API redirects, and the token must not travel.
  const api = got.extend({
    headers: {
      'user-agent': 'media-gen-service',
      ...(options.token ? { authorization: `Bearer ${options.token}` } : {}),
    },
    responseType: 'json',
    followRedirect: false,
  });
  // The download client: no token (output files are served publicly by replicate.delivery; the token is
  // not for a CDN), buffers, redirects only to allowed places.
  const downloader = got.extend({
    headers: { 'user-agent': 'media-gen-service' },
    responseType: 'buffer',
    maxRedirects: 5,
    followRedirect: (response) => {
      const location = response.headers.location;
      if (!location) return false;
      try {
        return isAllowedDownloadUrl(new URL(location, response.url), options.downloadHosts);
      } catch {
        return false;
      }
    },
  });

  type RequestKind = 'create' | 'create-idempotent' | 'get' | 'cancel' | 'download';

  /**
   * got's retry options for one request. 429: wait what the server asks for (body `retry_after`, else
   * `Retry-After`) while that is ≤ maxRateLimitWaitMs and within the deadline; 5xx and network errors:
   * exponential backoff (honouring Retry-After), at most maxRetries times.
   *
   * POST create is NOT retried on 5xx or on errors after the request may have reached Replicate
   * (ECONNRESET, timeouts): Replicate has no idempotency key, and a 5xx (a gateway timing out during
   * `Prefer: wait`, say) can come back after the prediction was created, so a retry could run — and bill —
   * the model twice. Such failures become a retryable ProviderError and the job's own retry decides.
   * It IS retried on 429 (Replicate refused it: nothing was created) and on errors that happen before
   * the request is sent (connection refused, DNS). Cog's `PUT /predictions/{id}` is idempotent (the same id
   * rejoins the running prediction), so it is retried like a GET.
   */
  function retryFor(kind: RequestKind, deadlineAt: number): Partial<RetryOptions> {
    let failures = 0;
    const createOnly = kind === 'create';
    return {
      limit: kind === 'cancel' ? 1 : 1000, // the real limits are applied in calculateDelay below
      methods: kind === 'create' ? ['POST'] : kind === 'create-idempotent' ? ['PUT'] : kind === 'cancel' ? ['POST'] : ['GET'],
      statusCodes: createOnly ? [429] : TRANSIENT_STATUS_CODES,
      errorCodes: createOnly ? NOT_SENT_ERROR_CODES : NETWORK_ERROR_CODES,
      maxRetryAfter: options.maxRateLimitWaitMs,
      calculateDelay: ({ error, retryAfter }: RetryObject) => {
        const status = error.response?.statusCode;
        let delay: number;
        if (status === 429) {
          delay = rateLimitWaitMs(error) ?? retryAfter ?? backoffMs;
          if (delay > options.maxRateLimitWaitMs) return 0;
          delay = Math.max(delay, Math.min(backoffMs, 1000)); // `retry_after: 0` must not become a busy loop
        } else {
          failures++;
          if (failures > maxRetries) return 0;
          delay = Math.min(backoffMs * 2 ** (failures - 1), backoffLimitMs) * (1 + Math.random() * 0.2);
          if (retryAfter !== undefined) delay = Math.max(delay, retryAfter);
        }
        if (Date.now() + delay >= deadlineAt) return 0;
        logDebug(
          { method: error.options.method, url: urlForLog(error.options.url), status, code: error.code, delayMs: Math.round(delay) },
          'replicate: retrying',
        );
        return Math.max(1, Math.round(delay));
      },
    };
  }

  function logDebug(fields: Record<string, unknown>, message: string): void {
    log?.debug(fields, message);
  }

  /** The API URL to use for a URL the server returned: it must be on the API's own origin (the token goes with it). */
  function apiUrl(candidate: string | undefined, fallbackPath: string): string {
    if (candidate) {
      try {
        if (new URL(candidate).origin === apiOrigin) return candidate;
      } catch {
        /* fall through */
      }
    }
    return `${baseUrl}${fallbackPath}`;
  }

  async function send(
    method: 'GET' | 'POST' | 'PUT',
    url: string,
    kind: RequestKind,
    init: {
      json?: unknown;
      headers?: Record<string, string>;
      signal?: AbortSignal;
      timeoutMs: number;
      deadlineAt: number;
      predictionId?: string;
      /** Awaited before each retry (after its delay). */
      beforeRetry?: () => Promise<void>;
    },
  ): Promise<Prediction> {
    const beforeRetry = init.beforeRetry;
    try {
      const response = await api(url, {
        method,
        json: init.json,
        headers: init.headers,
        signal: init.signal,
        timeout: { request: init.timeoutMs },
        retry: retryFor(kind, init.deadlineAt),
        hooks: beforeRetry ? { beforeRetry: [() => beforeRetry()] } : undefined,
      });
      const body = (response.body ?? {}) as Prediction;
      logDebug({ method, url: urlForLog(url), status: response.statusCode, predictionId: body.id ?? init.predictionId }, 'replicate: request');
      return body;
    } catch (error) {
      if (init.signal?.aborted) throw new Interrupted('interrupted', { cause: init.signal.reason });
      const status = error instanceof HTTPError ? error.response.statusCode : undefined;
      logDebug({ method, url: urlForLog(url), status, code: (error as RequestError).code, predictionId: init.predictionId }, 'replicate: request failed');
      throw error;
    }
  }

  /** Best-effort cancel with a short timeout; never throws. */
  async function cancel(url: string, predictionId: string): Promise<void> {
    try {
      await send('POST', url, 'cancel', {
        signal: AbortSignal.timeout(cancelTimeoutMs),
        timeoutMs: cancelTimeoutMs,
        deadlineAt: Date.now() + cancelTimeoutMs,
        predictionId,
      });
    } catch (error) {
      logDebug({ predictionId, err: describe(error) }, 'replicate: cancel failed');
    }
  }

  async function download(ref: unknown, index: number, signal: AbortSignal, context: ErrorContext): Promise<GeneratedImage> {
    const label = `output ${index + 1}`;
    const fail = (message: string, cause?: unknown): never => {
      throw providerError('retryable', `${label} ${message}`, context, cause);
    };
    if (typeof ref !== 'string' || ref === '') return fail('is not a URL');
    let data: Buffer;
    if (ref.startsWith('data:')) {
      try {
        data = decodeDataUri(ref, options.downloadMaxBytes).data;
      } catch (error) {
        return fail(`could not be used: data: URI ${(error as Error).message}`);
      }
    } else {
      let url: URL;
      try {
        url = new URL(ref);
      } catch {
        return fail('is not a URL');
      }
      if (!isAllowedDownloadUrl(url, options.downloadHosts)) {
        return fail(`is on a host that is not allowed for downloads (${url.protocol}//${url.host})`);
      }
      const sizeGuard = new AbortController();
      const downloadSignal = AbortSignal.any([signal, sizeGuard.signal]);
      try {
        const response = await downloader(url, {
          signal: downloadSignal,
          timeout: { request: options.downloadTimeoutMs },
          retry: retryFor('download', Date.now() + options.downloadTimeoutMs),
        }).on('downloadProgress', (progress) => {
          if ((progress.total ?? 0) > options.downloadMaxBytes || progress.transferred > options.downloadMaxBytes) sizeGuard.abort();
        });
        logDebug({ method: 'GET', url: urlForLog(url.href), status: response.statusCode, predictionId: context.predictionId }, 'replicate: download');
        if (response.statusCode >= 300) {
          return fail(`redirects to a host that is not allowed for downloads (${redirectTarget(response.headers.location, url)})`);
        }
        data = Buffer.from(response.rawBody.buffer, response.rawBody.byteOffset, response.rawBody.byteLength);
      } catch (error) {
        if (error instanceof ProviderError) throw error;
        if (signal.aborted) throw new Interrupted('interrupted', { cause: signal.reason });
        if (sizeGuard.signal.aborted) return fail(`is larger than the ${options.downloadMaxBytes}-byte limit`);
        const status = error instanceof HTTPError ? ` (HTTP ${error.response.statusCode})` : '';
        logDebug({ method: 'GET', url: urlForLog(url.href), err: describe(error), predictionId: context.predictionId }, 'replicate: download failed');
        return fail(`could not be downloaded${status}: ${(error as Error).message}`, error);
      }
      if (data.length > options.downloadMaxBytes) return fail(`is larger than the ${options.downloadMaxBytes}-byte limit`);
    }
    const contentType = sniffImageType(data);
    if (!contentType) return fail('is not an image');
    return { data, contentType };
  }

  async function downloadAll(output: unknown, signal: AbortSignal, context: ErrorContext): Promise<GeneratedImage[]> {
    const refs = Array.isArray(output) ? output : output === null || output === undefined ? [] : [output];
    if (refs.length === 0) throw providerError('retryable', 'the prediction succeeded but returned no output', context);
    return Promise.all(refs.map((ref, index) => download(ref, index, signal, context)));
  }

  function reportProgress(prediction: Prediction, hooks: GenerationHooks | undefined, last: { value?: number }): void {
    const fraction = parseProgress(prediction.logs);
    if (fraction !== undefined && fraction !== last.value) {
      last.value = fraction;
      hooks?.onProgress?.(fraction);
    }
  }

  /** The result of a terminal prediction, or the error it stands for. */
  async function finish(prediction: Prediction, signal: AbortSignal, context: ErrorContext): Promise<GenerationResult> {
    context.predictTimeMs = predictTimeMs(prediction);
    switch (prediction.status) {
      case 'succeeded': {
        const images = await downloadAll(prediction.output, signal, context);
        return { images, predictionId: context.predictionId, predictTimeMs: context.predictTimeMs };
      }
      case 'failed': {
        const message = typeof prediction.error === 'string' && prediction.error ? prediction.error : 'unknown error';
        const kind: ProviderErrorKind = isPermanentPredictionError(message) ? 'permanent' : 'retryable';
        throw providerError(kind, `prediction failed: ${message}`, context);
      }
      case 'canceled':
      case 'aborted':
        throw providerError('retryable', `prediction was ${prediction.status} before it finished`, context);
      default:
        throw providerError('retryable', `prediction ended in an unexpected status ${JSON.stringify(prediction.status)}`, context);
    }
  }

  async function generateOnReplicate(
    request: GenerationRequest,
    hooks: GenerationHooks | undefined,
    deadlineAt: number,
    interrupt: AbortSignal,
    context: ErrorContext,
  ): Promise<GenerationResult> {
    const input = toReplicateInput(request);
    const remainingS = Math.floor((deadlineAt - Date.now()) / 1000);
    const wait = Math.max(1, Math.min(60, Math.floor(options.waitSeconds), remainingS));
    const headers: Record<string, string> = {
      // Replicate cancels the prediction itself at our deadline, even if this process dies (minimum 5 s).
      'cancel-after': `${Math.max(5, Math.ceil((deadlineAt - Date.now()) / 1000))}s`,
    };
    // Prefer: wait only when the deadline leaves at least a second to wait (it must be 1–60 s).
    if (remainingS >= 1) headers.prefer = `wait=${wait}`;
    const createUrl = modelPath.version ? `${baseUrl}/predictions` : `${baseUrl}/models/${modelPath.owner}/${modelPath.name}/predictions`;
    const body = modelPath.version ? { version: modelPath.version, input } : { input };

    // The fleet's create limit: a token before the create, and before each retry of it after a 429.
    const takeCreateToken = async () => {
      if (!options.createLimit) return;
      try {
        await options.createLimit.take(interrupt, deadlineAt - Date.now());
      } catch (error) {
        if (interrupt.aborted) throw new Interrupted('interrupted', { cause: interrupt.reason });
        if (error instanceof RateLimitBookedError) {
          throw providerError('retryable', `waiting for a create token would pass the deadline (${error.message})`, context);
        }
        throw error;
      }
    };
    await takeCreateToken();

    // The create request is not aborted when the caller or the deadline interrupts: Replicate tells the
    // prediction's id only in its answer, so it is left to finish in the background and the prediction is
    // canceled then. The caller is answered at once all the same.
    const creating = send('POST', createUrl, 'create', {
      json: body,
      headers,
      timeoutMs: wait * 1000 + 15_000,
      deadlineAt,
      beforeRetry: options.createLimit ? takeCreateToken : undefined,
    });
    let prediction: Prediction;
    try {
      prediction = await raceInterrupt(creating, interrupt);
    } catch (error) {
      if (error instanceof Interrupted) {
        void creating.then(
          (orphan) => {
            if (orphan.id && !TERMINAL_STATUSES.has(orphan.status ?? '')) {
              logDebug({ predictionId: orphan.id }, 'replicate: canceling a prediction created after the caller stopped waiting');
              return cancel(apiUrl(orphan.urls?.cancel, `/predictions/${orphan.id}/cancel`), orphan.id);
            }
          },
          () => undefined,
        );
      }
      throw error;
    }
    if (!prediction.id) throw providerError('retryable', 'Replicate answered without a prediction id', context);
    const id = prediction.id;
    context.predictionId = id;
    hooks?.onPrediction?.(id);
    const cancelUrl = apiUrl(prediction.urls?.cancel, `/predictions/${id}/cancel`);
    const getUrl = apiUrl(prediction.urls?.get, `/predictions/${id}`);
    context.cancel = () => cancel(cancelUrl, id);
    const progress: { value?: number } = {};
    reportProgress(prediction, hooks, progress);

    while (!TERMINAL_STATUSES.has(prediction.status ?? '')) {
      if (interrupt.aborted) throw new Interrupted('interrupted');
      try {
        await sleep(options.pollIntervalMs, undefined, { signal: interrupt });
      } catch {
        throw new Interrupted('interrupted');
      }
      prediction = await send('GET', getUrl, 'get', {
        signal: interrupt,
        timeoutMs: Math.max(1000, Math.min(30_000, deadlineAt - Date.now())),
        deadlineAt,
        predictionId: id,
      });
      reportProgress(prediction, hooks, progress);
    }
    context.cancel = undefined; // terminal: nothing left to cancel
    return finish(prediction, interrupt, context);
  }

  async function generateOnCog(
    request: GenerationRequest,
    hooks: GenerationHooks | undefined,
    deadlineAt: number,
    interrupt: AbortSignal,
    context: ErrorContext,
  ): Promise<GenerationResult> {
    // Cog's idempotent `PUT /predictions/{id}` with an id we choose: it answers synchronously, a retry
    // with the same id rejoins the running prediction instead of starting another, and the id is known
    // before the answer, so `POST /predictions/{id}/cancel` can be tried on abort. (Cog documents that
    // synchronous predictions may not be cancelable; then the cancel is a harmless no-op/404 and the
    // model finishes on its own. Cog offers no polling, so there is no progress either.)
    const id = cogPredictionId();
    context.predictionId = id;
    hooks?.onPrediction?.(id);
    context.cancel = () => cancel(`${baseUrl}/predictions/${id}/cancel`, id);
    const prediction = await send('PUT', `${baseUrl}/predictions/${id}`, 'create-idempotent', {
      json: { id, input: toCogInput(request) },
      signal: interrupt,
      timeoutMs: Math.max(1, deadlineAt - Date.now()),
      deadlineAt,
      predictionId: id,
    });
    reportProgress(prediction, hooks, {});
    if (!TERMINAL_STATUSES.has(prediction.status ?? '')) {
      throw providerError('retryable', `Cog answered with a prediction in status ${JSON.stringify(prediction.status)}`, context);
    }
    context.cancel = undefined;
    return finish(prediction, interrupt, context);
  }

  return {
    name: 'replicate',
    async generate(request: GenerationRequest, signal: AbortSignal, hooks?: GenerationHooks): Promise<GenerationResult> {
      signal.throwIfAborted();
      const deadlineAt = Date.now() + options.deadlineMs;
      const deadline = AbortSignal.timeout(options.deadlineMs);
      const interrupt = AbortSignal.any([signal, deadline]);
      const context: ErrorContext = {};
      try {
        return apiStyle === 'cog'
          ? await generateOnCog(request, hooks, deadlineAt, interrupt, context)
          : await generateOnReplicate(request, hooks, deadlineAt, interrupt, context);
      } catch (error) {
        if (signal.aborted || deadline.aborted || error instanceof Interrupted) {
          await context.cancel?.();
          if (signal.aborted) throw signal.reason;
          throw providerError('retryable', `deadline of ${options.deadlineMs} ms exceeded`, context);
        }
        // Failing while a prediction still runs (polling broke down, say): don't leave it running and
        // billing while the job's retry starts another one.
        await context.cancel?.();
        if (error instanceof ProviderError) throw error;
        throw mapRequestError(error, context);
      }
    },
  };
}

// ---------------------------------------------------------------------------------------------------
// Errors

interface ErrorContext {
  predictionId?: string;
  predictTimeMs?: number;
  /** Cancels the remote prediction (best-effort); set while there is one running. */
  cancel?: () => Promise<void>;
}

function providerError(kind: ProviderErrorKind, message: string, context: ErrorContext, cause?: unknown): ProviderError {
  return new ProviderError(kind, `replicate: ${message}`, {
    cause: cause === undefined ? undefined : sanitizedCause(cause),
    predictionId: context.predictionId,
    predictTimeMs: context.predictTimeMs,
  });
}

/** A plain Error in place of got's (whose `options` hold the Authorization header), so logging a cause can't leak the token. */
function sanitizedCause(error: unknown): Error {
  const plain = new Error(describe(error));
  const code = typeof error === 'object' && error !== null && 'code' in error ? error.code : undefined;
  if (typeof code === 'string') Object.assign(plain, { code });
  return plain;
}

function describe(error: unknown): string {
  if (error instanceof HTTPError) return `HTTP ${error.response.statusCode} from ${urlForLog(error.options.url)}`;
  if (error instanceof Error) return `${error.name}: ${error.message}`;
  return String(error);
}

/** Replicate's error body (`{title, detail, status}`, or Cog/FastAPI's `{detail: [{loc, msg}]}`) as one line. */
function errorDetail(body: unknown): string | undefined {
  if (typeof body === 'string') return body.trim().slice(0, 500) || undefined;
  if (body instanceof Uint8Array) return errorDetail(Buffer.from(body).toString('utf8'));
  if (!body || typeof body !== 'object') return undefined;
  const { detail, title } = body as { detail?: unknown; title?: unknown };
  if (typeof detail === 'string' && detail.trim()) return detail.trim();
  if (Array.isArray(detail)) {
    return detail
      .map((d) => {
        const item = d as { loc?: unknown; msg?: unknown };
        const where = Array.isArray(item.loc) ? item.loc.join('.') : '';
        return `${where ? `${where}: ` : ''}${typeof item.msg === 'string' ? item.msg : JSON.stringify(d)}`;
      })
      .join('; ');
  }
  if (typeof title === 'string' && title.trim()) return title.trim();
  return undefined;
}

/** The wait (ms) a 429 asks for: the body's `retry_after` (seconds), else `Retry-After` (fractions too), else the detail's words. */
function rateLimitWaitMs(error: RequestError): number | undefined {
  const response = error.response;
  if (!response) return undefined;
  let body: unknown = response.body;
  if (body instanceof Uint8Array || typeof body === 'string') {
    try {
      body = JSON.parse(Buffer.from(body as Uint8Array).toString('utf8'));
    } catch {
      body = undefined;
    }
  }
  const fromBody = (body as { retry_after?: unknown } | undefined)?.retry_after;
  if (typeof fromBody === 'number' && Number.isFinite(fromBody) && fromBody >= 0) return fromBody * 1000;
  if (typeof fromBody === 'string' && /^\d+(\.\d+)?$/.test(fromBody)) return Number(fromBody) * 1000;
  const header = response.headers['retry-after'];
  if (typeof header === 'string' && /^\d+(\.\d+)?$/.test(header.trim())) return Number(header) * 1000;
  // Replicate's rate-limit docs show only a sentence: "Expected available in 1 second." / "Your rate limit resets in ~30s."
  const detail = (body as { detail?: unknown } | undefined)?.detail;
  const said = typeof detail === 'string' ? /(?:available in|resets in)\s*~?\s*(\d+(?:\.\d+)?)\s*s/i.exec(detail) : null;
  if (said) return Number(said[1]) * 1000;
  return undefined;
}

function mapRequestError(error: unknown, context: ErrorContext): ProviderError {
  if (error instanceof HTTPError) {
    const status = error.response.statusCode;
    const detail = errorDetail(error.response.body) ?? error.response.statusMessage ?? '';
    const suffix = detail ? `: ${detail}` : '';
    if (status === 401 || status === 403) return providerError('permanent', `the API token was refused (${status})${suffix}`, context, error);
    if (status === 404) return providerError('permanent', `unknown model or prediction (404)${suffix}`, context, error);
    if (status === 422) return providerError('permanent', `invalid input (422)${suffix}`, context, error);
    if (status === 429) return providerError('retryable', `rate limited (429)${suffix}`, context, error);
    if (status === 400) return providerError('permanent', `bad request (400)${suffix}`, context, error);
    // 402 (billing), 408, 409 (Cog busy), 425, 5xx: not the request's fault, worth another attempt later.
    const kind: ProviderErrorKind = status >= 500 || [402, 408, 409, 425].includes(status) ? 'retryable' : 'permanent';
    return providerError(kind, `HTTP ${status}${suffix}`, context, error);
  }
  if (error instanceof TimeoutError) return providerError('retryable', `request timed out: ${error.message}`, context, error);
  if (error instanceof RequestError) return providerError('retryable', `request failed (${error.code}): ${error.message}`, context, error);
  return providerError('retryable', `unexpected error: ${error instanceof Error ? error.message : String(error)}`, context, error);
}

// ---------------------------------------------------------------------------------------------------
// Bits

function predictTimeMs(prediction: Prediction): number | undefined {
  const seconds = prediction.metrics?.predict_time;
  return typeof seconds === 'number' && Number.isFinite(seconds) ? Math.round(seconds * 1000) : undefined;
}

/** `promise`, or an Interrupted rejection as soon as `signal` fires (the promise itself runs on). */
function raceInterrupt<T>(promise: Promise<T>, signal: AbortSignal): Promise<T> {
  if (signal.aborted) {
    promise.catch(() => undefined);
    return Promise.reject(new Interrupted('interrupted'));
  }
  return new Promise<T>((resolve, reject) => {
    const onAbort = () => {
      promise.catch(() => undefined);
      reject(new Interrupted('interrupted'));
    };
    signal.addEventListener('abort', onAbort, { once: true });
    promise.then(
      (value) => {
        signal.removeEventListener('abort', onAbort);
        resolve(value);
      },
      (error: unknown) => {
        signal.removeEventListener('abort', onAbort);
        reject(error);
      },
    );
  });
}

/** A URL fit for logs: no query, no credentials, data: URIs shortened. */
function urlForLog(url: string | URL | undefined): string {
  const text = url instanceof URL ? url.href : (url ?? '');
  if (text.startsWith('data:')) return `${text.slice(0, 30)}…`;
  try {
    const u = new URL(text);
    return `${u.protocol}//${u.host}${u.pathname}`;
  } catch {
    return '[unparseable url]';
  }
}

function redirectTarget(location: string | undefined, base: URL): string {
  if (!location) return 'nowhere';
  try {
    const u = new URL(location, base);
    return `${u.protocol}//${u.host}`;
  } catch {
    return 'an unparseable location';
  }
}

/** 26 lowercase base32 characters from 128 random bits, as Cog's docs recommend. */
function cogPredictionId(): string {
  const alphabet = 'abcdefghijklmnopqrstuvwxyz234567';
  const bytes = randomBytes(16);
  let bits = 0;
  let value = 0;
  let out = '';
  for (const byte of bytes) {
    value = (value << 8) | byte;
    bits += 8;
    while (bits >= 5) {
      out += alphabet[(value >>> (bits - 5)) & 31];
      bits -= 5;
    }
  }
  if (bits > 0) out += alphabet[(value << (5 - bits)) & 31];
  return out;
}
