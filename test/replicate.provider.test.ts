// The Replicate provider against a local fake of Replicate's HTTP API (test/support/local-replicate.ts).
import { Writable } from 'node:stream';
import { pino } from 'pino';
import sharp from 'sharp';
import { ProviderError, type GenerationRequest } from '../src/providers/provider.ts';
import {
  chooseMegapixels,
  closestAspectRatio,
  createReplicateProvider,
  decodeDataUri,
  isAllowedDownloadUrl,
  isPermanentPredictionError,
  parseProgress,
  sniffImageType,
  toCogInput,
  toReplicateInput,
  type ReplicateProviderOptions,
} from '../src/providers/replicate.provider.ts';
import { startLocalReplicate, type LocalReplicate } from './support/local-replicate.ts';

const VERSION = 'a'.repeat(24) + '0123456789abcdef0123456789abcdef01234567';

let server: LocalReplicate;

beforeEach(async () => {
  server = await startLocalReplicate({
    models: [{ name: 'black-forest-labs/flux-schnell' }, { name: 'acme/pixel-model' }, { name: 'acme/square-only', aspectRatios: ['1:1'] }],
    versions: { [VERSION]: 'acme/pixel-model' },
  });
});

afterEach(async () => {
  await server.close();
});

function provider(overrides: Partial<ReplicateProviderOptions> = {}) {
  return createReplicateProvider({
    token: server.token,
    baseUrl: server.baseUrl,
    model: 'black-forest-labs/flux-schnell',
    apiStyle: 'replicate',
    waitSeconds: 5,
    deadlineMs: 10_000,
    pollIntervalMs: 10,
    maxRateLimitWaitMs: 2_000,
    downloadHosts: ['replicate.delivery', server.origin],
    downloadMaxBytes: 2 * 1024 * 1024,
    downloadTimeoutMs: 5_000,
    maxRetries: 3,
    retryBackoffMs: 10,
    cancelTimeoutMs: 1_000,
    ...overrides,
  });
}

function request(overrides: Partial<GenerationRequest> = {}): GenerationRequest {
  return { jobId: 'job-1', prompt: 'a red fox in the snow', width: 512, height: 512, outputFormat: 'png', numOutputs: 1, ...overrides };
}

const noAbort = () => new AbortController().signal;

/** The ProviderError a promise rejects with (fails the test if it resolves or rejects with something else). */
async function providerError(promise: Promise<unknown>): Promise<ProviderError> {
  const error = await promise.then(
    () => undefined,
    (e: unknown) => e,
  );
  expect(error).toBeInstanceOf(ProviderError);
  return error as ProviderError;
}

const onlyPrediction = () => {
  const all = [...server.predictions.values()];
  expect(all).toHaveLength(1);
  return all[0];
};

// ------------------------------------------------------------------------------------------------

describe('input mapping', () => {
  test.each([
    [512, 512, '1:1'],
    [1024, 576, '16:9'],
    [768, 512, '3:2'],
    [512, 768, '2:3'],
    [1344, 576, '21:9'],
    [576, 1344, '9:21'],
    [800, 1000, '4:5'],
    [1000, 800, '5:4'],
    [600, 800, '3:4'],
    [640, 480, '4:3'],
    [576, 1024, '9:16'],
    [2048, 64, '21:9'],
    [1100, 1000, '1:1'],
  ])('%i×%i → aspect ratio %s', (width, height, ratio) => {
    expect(closestAspectRatio(width, height)).toBe(ratio);
  });

  test.each([
    [512, 512, '0.25'],
    [256, 256, '0.25'],
    [560, 560, '0.25'],
    [2048, 64, '0.25'],
    [600, 600, '1'],
    [768, 512, '1'],
    [1024, 1024, '1'],
  ])('%i×%i → %s megapixels', (width, height, megapixels) => {
    expect(chooseMegapixels(width, height)).toBe(megapixels);
  });

  test('flux-schnell inputs: jpeg → jpg, seed and num_outputs passed, no width/height', () => {
    expect(toReplicateInput(request({ width: 1024, height: 576, outputFormat: 'jpeg', seed: 42, numOutputs: 3 }))).toEqual({
      prompt: 'a red fox in the snow',
      aspect_ratio: '16:9',
      megapixels: '1',
      output_format: 'jpg',
      seed: 42,
      num_outputs: 3,
    });
    const withoutSeed = toReplicateInput(request({ outputFormat: 'webp' }));
    expect(withoutSeed).not.toHaveProperty('seed');
    expect(withoutSeed.output_format).toBe('webp');
    expect(withoutSeed.seed).toBeUndefined();
  });

  test('Cog inputs carry width and height as asked', () => {
    expect(toCogInput(request({ width: 640, height: 480, outputFormat: 'jpeg', seed: 0 }))).toEqual({
      prompt: 'a red fox in the snow',
      width: 640,
      height: 480,
      output_format: 'jpg',
      seed: 0,
      num_outputs: 1,
    });
  });
});

describe('helpers', () => {
  test('progress is the last tqdm percentage in the logs', () => {
    expect(parseProgress('')).toBeUndefined();
    expect(parseProgress(null)).toBeUndefined();
    expect(parseProgress('Using seed: 1\nloading weights')).toBeUndefined();
    expect(parseProgress('  0%|          | 0/20 [00:00<?, ?it/s]\n 45%|████▌     | 9/20 [00:02<00:03, 3.3it/s]')).toBe(0.45);
    expect(parseProgress('100%|██████████| 4/4 [00:01<00:00, 3.21it/s]\n')).toBe(1);
  });

  test('image types are recognised by their magic bytes', async () => {
    const base = sharp({ create: { width: 8, height: 8, channels: 3, background: '#369' } });
    expect(sniffImageType(await base.clone().png().toBuffer())).toBe('image/png');
    expect(sniffImageType(await base.clone().jpeg().toBuffer())).toBe('image/jpeg');
    expect(sniffImageType(await base.clone().webp().toBuffer())).toBe('image/webp');
    expect(sniffImageType(await base.clone().gif().toBuffer())).toBe('image/gif');
    expect(sniffImageType(await base.clone().avif().toBuffer())).toBe('image/avif');
    expect(sniffImageType(Buffer.from('<html>nope</html>'))).toBeUndefined();
    expect(sniffImageType(Buffer.alloc(0))).toBeUndefined();
  });

  test('download allow-list: https hosts with subdomains, explicit origins for http', () => {
    const allowed = ['replicate.delivery', '*.example.org', 'http://127.0.0.1:4010'];
    const ok = (url: string) => isAllowedDownloadUrl(new URL(url), allowed);
    expect(ok('https://replicate.delivery/x.png')).toBe(true);
    expect(ok('https://pbxt.replicate.delivery/x.png')).toBe(true);
    expect(ok('https://cdn.example.org/x.png')).toBe(true);
    expect(ok('http://127.0.0.1:4010/x.png')).toBe(true);
    expect(ok('http://replicate.delivery/x.png')).toBe(false); // http to a host-name entry
    expect(ok('https://example.org/x.png')).toBe(false); // *.host is subdomains only
    expect(ok('https://evilreplicate.delivery/x.png')).toBe(false);
    expect(ok('https://replicate.delivery.evil.com/x.png')).toBe(false);
    expect(ok('http://127.0.0.1:4011/x.png')).toBe(false);
    expect(ok('https://127.0.0.1:4010/x.png')).toBe(false);
    expect(ok('https://user:pw@replicate.delivery/x.png')).toBe(false);
  });

  test('data: URIs are decoded with a size cap', () => {
    const png = Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a, 1, 2, 3]);
    expect(decodeDataUri(`data:image/png;base64,${png.toString('base64')}`, 100)).toEqual({ data: png, mediaType: 'image/png' });
    expect(decodeDataUri('data:,hi%20there', 100).data.toString()).toBe('hi there');
    expect(() => decodeDataUri(`data:image/png;base64,${Buffer.alloc(300).toString('base64')}`, 100)).toThrow(/limit/);
  });

  test('failed predictions about input or content policy are permanent', () => {
    expect(isPermanentPredictionError('All generated images contained NSFW content. Try running it again with a different prompt.')).toBe(true);
    expect(isPermanentPredictionError('Prompt was flagged by the safety checker')).toBe(true);
    expect(isPermanentPredictionError('This request violates our content policy')).toBe(true);
    expect(isPermanentPredictionError('Invalid input: width must be a multiple of 16')).toBe(true);
    expect(isPermanentPredictionError('CUDA out of memory. Tried to allocate 20.00 MiB')).toBe(false);
    expect(isPermanentPredictionError('Internal server error')).toBe(false);
  });
});

// ------------------------------------------------------------------------------------------------

describe('Replicate predictions', () => {
  test('succeeds in one round trip with Prefer: wait', async () => {
    const seen: string[] = [];
    const result = await provider().generate(request(), noAbort(), { onPrediction: (id) => seen.push(id) });

    const prediction = onlyPrediction();
    expect(seen).toEqual([prediction.id]);
    expect(result.predictionId).toBe(prediction.id);
    expect(result.predictTimeMs).toBe(1234);
    expect(result.images).toHaveLength(1);
    expect(result.images[0].contentType).toBe('image/png');
    expect((await sharp(result.images[0].data).metadata()).format).toBe('png');

    const creates = server.requestsOf('create');
    expect(creates).toHaveLength(1);
    expect(creates[0].path).toBe('/v1/models/black-forest-labs/flux-schnell/predictions');
    expect(creates[0].headers.prefer).toBe('wait=5');
    expect(creates[0].auth).toBe('valid');
    expect(creates[0].status).toBe(201);
    expect(server.requestsOf('get')).toHaveLength(0);
    // Output files are fetched without the token.
    expect(server.requestsOf('delivery').map((r) => r.auth)).toEqual(['none']);
  });

  test('polls a slow prediction until it succeeds, reporting progress', async () => {
    server.setScenario({ processingPolls: 4, preferWaitCapMs: 20 });
    const progress: number[] = [];
    const result = await provider().generate(request(), noAbort(), { onProgress: (f) => progress.push(f) });

    expect(result.images).toHaveLength(1);
    const gets = server.requestsOf('get');
    expect(gets).toHaveLength(4);
    expect(gets.every((r) => r.auth === 'valid' && r.path === `/v1/predictions/${result.predictionId}`)).toBe(true);
    expect(progress).toEqual([0, 0.25, 0.5, 0.75, 1]);
  });

  test('a versioned model is run through POST /v1/predictions with its version', async () => {
    const result = await provider({ model: `acme/pixel-model:${VERSION}` }).generate(request(), noAbort());
    expect(result.images).toHaveLength(1);
    const [create] = server.requestsOf('create');
    expect(create.route).toBe('create-version');
    expect(create.path).toBe('/v1/predictions');
    expect(create.body).toMatchObject({ version: VERSION, input: { prompt: 'a red fox in the snow' } });
  });

  test('parameters are mapped onto the model inputs and every output is downloaded', async () => {
    const result = await provider().generate(request({ width: 1024, height: 576, outputFormat: 'jpeg', seed: 42, numOutputs: 3 }), noAbort());

    expect(server.requestsOf('create')[0].body).toEqual({
      input: { prompt: 'a red fox in the snow', aspect_ratio: '16:9', megapixels: '1', output_format: 'jpg', seed: 42, num_outputs: 3 },
    });
    expect(result.images.map((i) => i.contentType)).toEqual(['image/jpeg', 'image/jpeg', 'image/jpeg']);
    expect(server.requestsOf('delivery')).toHaveLength(3);
    const meta = await sharp(result.images[2].data).metadata();
    expect([meta.format, meta.width, meta.height]).toEqual(['jpeg', 1360, 768]);
  });

  test('a single output URL (not an array) is accepted', async () => {
    server.setScenario({ outputShape: 'string' });
    const result = await provider().generate(request(), noAbort());
    expect(result.images).toHaveLength(1);
  });
});

describe('rate limits and server errors', () => {
  test('a burst of 429s is waited out as retry_after asks, without failing', async () => {
    server.faults.push({ kind: 'rate-limit', route: 'create', count: 3, retryAfter: 0.1 });
    const result = await provider().generate(request(), noAbort());

    expect(result.images).toHaveLength(1);
    const creates = server.requestsOf('create');
    expect(creates.map((r) => r.status)).toEqual([429, 429, 429, 201]);
    const gaps = creates.slice(1).map((r, i) => r.at - creates[i].at);
    for (const gap of gaps) {
      expect(gap).toBeGreaterThanOrEqual(95);
      expect(gap).toBeLessThan(900); // the body's 0.1 s, not the header's rounded-up 1 s
    }
  });

  test('a 429 with only a Retry-After header is honoured', async () => {
    server.setScenario({ processingPolls: 1, preferWaitCapMs: 10 });
    server.faults.push({ kind: 'rate-limit', route: 'get', count: 1, retryAfter: 1, inBody: false, header: '1' });
    const result = await provider().generate(request(), noAbort());

    expect(result.images).toHaveLength(1);
    const gets = server.requestsOf('get');
    expect(gets.map((r) => r.status)).toEqual([429, 200]);
    expect(gets[1].at - gets[0].at).toBeGreaterThanOrEqual(990);
  });

  test('a 429 that says when only in its detail text is waited out as it says', async () => {
    server.faults.push({ kind: 'rate-limit', route: 'create', count: 1, retryAfter: 0.3, inBody: false, header: false });
    const result = await provider().generate(request(), noAbort());

    expect(result.images).toHaveLength(1);
    const creates = server.requestsOf('create');
    expect(creates.map((r) => r.status)).toEqual([429, 201]);
    expect(creates[1].at - creates[0].at).toBeGreaterThanOrEqual(295);
  });

  test.each([
    ['body and header', { header: '5' as const }],
    ['body only', { header: false as const }],
  ])('a 429 asking for longer than the maximum wait is a retryable error (%s)', async (_, extra) => {
    server.faults.push({ kind: 'rate-limit', route: 'create', count: 5, retryAfter: 5, ...extra });
    const error = await providerError(provider({ maxRateLimitWaitMs: 1_000 }).generate(request(), noAbort()));

    expect(error.kind).toBe('retryable');
    expect(error.message).toMatch(/rate limited \(429\)/);
    expect(server.requestsOf('create')).toHaveLength(1);
  });

  test('5xx while polling is retried by got, then succeeds', async () => {
    server.setScenario({ processingPolls: 2, preferWaitCapMs: 10 });
    server.faults.push({ kind: 'server-error', route: 'get', count: 2, status: 503 });
    const result = await provider().generate(request(), noAbort());

    expect(result.images).toHaveLength(1);
    expect(server.requestsOf('get').map((r) => r.status)).toEqual([503, 503, 200, 200]);
  });

  test('persistent 5xx is a retryable error after the retries, and the prediction is canceled', async () => {
    server.setScenario({ processingPolls: 5, preferWaitCapMs: 10 });
    server.faults.push({ kind: 'server-error', route: 'get', count: 100, status: 500 });
    const error = await providerError(provider({ maxRetries: 2 }).generate(request(), noAbort()));

    expect(error.kind).toBe('retryable');
    expect(error.message).toMatch(/HTTP 500/);
    expect(error.predictionId).toBe(onlyPrediction().id);
    expect(server.requestsOf('get')).toHaveLength(3);
    expect(server.requestsOf('cancel')).toHaveLength(1);
  });

  test('a 5xx on create is not retried (no double create) and is retryable', async () => {
    server.faults.push({ kind: 'server-error', route: 'create', count: 1, status: 502 });
    const error = await providerError(provider().generate(request(), noAbort()));

    expect(error.kind).toBe('retryable');
    expect(server.requestsOf('create')).toHaveLength(1);
  });

  test('a connection dropped after the create was sent is not retried and is retryable', async () => {
    server.faults.push({ kind: 'drop', route: 'create', count: 1 });
    const error = await providerError(provider().generate(request(), noAbort()));

    expect(error.kind).toBe('retryable');
    expect(server.requestsOf('create')).toHaveLength(1);
  });
});

describe('permanent failures', () => {
  test('401 (bad token) is permanent with the provider message', async () => {
    const error = await providerError(provider({ token: 'r8_wrong' }).generate(request(), noAbort()));
    expect(error.kind).toBe('permanent');
    expect(error.message).toMatch(/token was refused \(401\): You did not pass a valid authentication token/);
    expect(server.requestsOf('create')[0].auth).toBe('invalid');
  });

  test('404 (unknown model) is permanent', async () => {
    const error = await providerError(provider({ model: 'acme/no-such-model' }).generate(request(), noAbort()));
    expect(error.kind).toBe('permanent');
    expect(error.message).toMatch(/unknown model.*404/);
  });

  test('422 (invalid input) is permanent with the detail', async () => {
    const error = await providerError(provider({ model: 'acme/square-only' }).generate(request({ width: 768, height: 512 }), noAbort()));
    expect(error.kind).toBe('permanent');
    expect(error.message).toMatch(/invalid input \(422\): - input\.aspect_ratio: aspect_ratio must be one of the following: "1:1"/);
  });

  test('a prediction failed for NSFW content is permanent with the provider message', async () => {
    const message = 'All generated images contained NSFW content. Try running it again with a different prompt.';
    server.setScenario({ outcome: { failed: message } });
    const error = await providerError(provider().generate(request(), noAbort()));

    expect(error.kind).toBe('permanent');
    expect(error.message).toContain(message);
    expect(error.predictionId).toBe(onlyPrediction().id);
    expect(error.predictTimeMs).toBe(1234);
  });

  test('a prediction failed for another reason is retryable, with its id and time', async () => {
    server.setScenario({ outcome: { failed: 'CUDA out of memory. Tried to allocate 20.00 MiB' }, predictTime: 2.5 });
    const error = await providerError(provider().generate(request(), noAbort()));

    expect(error.kind).toBe('retryable');
    expect(error.message).toMatch(/CUDA out of memory/);
    expect(error.predictionId).toBe(onlyPrediction().id);
    expect(error.predictTimeMs).toBe(2500);
  });

  test('a prediction canceled by someone else is retryable', async () => {
    server.setScenario({ outcome: 'canceled' });
    const error = await providerError(provider().generate(request(), noAbort()));
    expect(error.kind).toBe('retryable');
    expect(error.message).toMatch(/canceled/);
  });
});

describe('deadline and abort', () => {
  test('past the deadline the prediction is canceled and a retryable error thrown', async () => {
    server.setScenario({ neverFinish: true });
    const started = Date.now();
    const error = await providerError(provider({ deadlineMs: 300 }).generate(request(), noAbort()));

    expect(Date.now() - started).toBeLessThan(2_000);
    expect(error.kind).toBe('retryable');
    expect(error.message).toMatch(/deadline/);
    const prediction = onlyPrediction();
    expect(error.predictionId).toBe(prediction.id);
    expect(server.requestsOf('cancel').map((r) => r.path)).toEqual([`/v1/predictions/${prediction.id}/cancel`]);
    expect(prediction.status).toBe('canceled');
  });

  test('an abort while polling cancels the prediction and rejects promptly with the abort reason', async () => {
    server.setScenario({ neverFinish: true, preferWaitCapMs: 10 });
    const controller = new AbortController();
    const generating = provider().generate(request(), controller.signal);
    const settled = generating.catch((e: unknown) => e);
    await server.waitForRequest((r) => r.route === 'get');

    const reason = new Error('worker shutting down');
    const abortedAt = Date.now();
    controller.abort(reason);
    expect(await settled).toBe(reason);
    expect(Date.now() - abortedAt).toBeLessThan(1_000);
    expect(server.requestsOf('cancel')).toHaveLength(1);
    expect(onlyPrediction().status).toBe('canceled');
  });

  test('an abort during the create answers at once and cancels the prediction once its id arrives', async () => {
    server.setScenario({ neverFinish: true, preferWaitCapMs: 300 });
    const controller = new AbortController();
    const settled = provider()
      .generate(request(), controller.signal)
      .catch((e: unknown) => e);
    const create = await server.waitForRequest((r) => r.route === 'create-model');

    const reason = new Error('job canceled');
    controller.abort(reason);
    expect(await settled).toBe(reason);
    expect(create.status).toBeUndefined(); // rejected before Replicate answered the create

    const cancel = await server.waitForRequest((r) => r.route === 'cancel');
    expect(cancel.path).toBe(`/v1/predictions/${onlyPrediction().id}/cancel`);
    expect(onlyPrediction().status).toBe('canceled');
  });

  test('an already aborted signal makes no request', async () => {
    const controller = new AbortController();
    controller.abort(new Error('too late'));
    await expect(provider().generate(request(), controller.signal)).rejects.toThrow('too late');
    expect(server.requests).toHaveLength(0);
  });
});

describe('downloads', () => {
  test('an output on a host that is not allowed is refused without fetching it', async () => {
    server.setScenario({ output: ({ foreignOrigin, id }) => `${foreignOrigin}/delivery/${id}/out-0.png` });
    const error = await providerError(provider().generate(request(), noAbort()));

    expect(error.kind).toBe('retryable');
    expect(error.message).toMatch(/output 1 is on a host that is not allowed/);
    expect(server.requestsOf('delivery')).toHaveLength(0);
  });

  test('plain http is refused for a host allowed by name (https only)', async () => {
    // `localhost` is allowed as a host name, which means https only; the output is plain http.
    server.setScenario({ output: ({ foreignOrigin, id }) => `${foreignOrigin}/delivery/${id}/out-0.png` });
    const error = await providerError(provider({ downloadHosts: ['replicate.delivery', 'localhost'] }).generate(request(), noAbort()));

    expect(error.kind).toBe('retryable');
    expect(error.message).toMatch(/output 1 is on a host that is not allowed for downloads \(http:\/\/localhost:\d+\)/);
    expect(server.requestsOf('delivery')).toHaveLength(0);
  });

  test('a redirect to an allowed host is followed', async () => {
    server.setScenario({ delivery: 'redirect-same-host' });
    const result = await provider().generate(request(), noAbort());
    expect(result.images[0].contentType).toBe('image/png');
    expect(server.requestsOf('delivery').map((r) => r.status)).toEqual([302, 200]);
  });

  test('a redirect to a foreign host is refused', async () => {
    server.setScenario({ delivery: 'redirect-foreign' });
    const error = await providerError(provider().generate(request(), noAbort()));

    expect(error.kind).toBe('retryable');
    expect(error.message).toMatch(/output 1 redirects to a host that is not allowed/);
    expect(server.requestsOf('delivery')).toHaveLength(1);
    expect(server.requests.some((r) => r.host.startsWith('localhost'))).toBe(false);
  });

  test.each([
    ['with a Content-Length', 'huge' as const],
    ['streamed without a length', 'huge-chunked' as const],
  ])('an output over the size cap is refused (%s)', async (_, delivery) => {
    server.setScenario({ delivery, hugeBytes: 4 * 1024 * 1024 });
    const error = await providerError(provider({ downloadMaxBytes: 256 * 1024 }).generate(request(), noAbort()));

    expect(error.kind).toBe('retryable');
    expect(error.message).toMatch(/output 1 is larger than the 262144-byte limit/);
  });

  test('bytes that are not an image are a retryable "not an image"', async () => {
    server.setScenario({ delivery: 'garbage' });
    const error = await providerError(provider().generate(request(), noAbort()));
    expect(error.kind).toBe('retryable');
    expect(error.message).toMatch(/output 1 is not an image/);
    expect(error.predictionId).toBe(onlyPrediction().id);
  });

  test('a truncated download is a retryable error', async () => {
    server.setScenario({ delivery: 'truncated' });
    const error = await providerError(provider({ maxRetries: 1 }).generate(request(), noAbort()));
    expect(error.kind).toBe('retryable');
    expect(error.message).toMatch(/output 1 could not be downloaded/);
  });

  test('data: URI outputs are accepted', async () => {
    server.setScenario({ output: 'data-uri' });
    const result = await provider().generate(request({ outputFormat: 'webp', numOutputs: 2 }), noAbort());
    expect(result.images.map((i) => i.contentType)).toEqual(['image/webp', 'image/webp']);
    expect(server.requestsOf('delivery')).toHaveLength(0);
  });

  test('a data: URI over the size cap is refused', async () => {
    server.setScenario({ output: 'data-uri' });
    const error = await providerError(provider({ downloadMaxBytes: 100 }).generate(request(), noAbort()));
    expect(error.kind).toBe('retryable');
    expect(error.message).toMatch(/output 1 could not be used: data: URI larger than the 100-byte limit/);
  });
});

describe('Cog API style', () => {
  const cogProvider = (overrides: Partial<ReplicateProviderOptions> = {}) =>
    provider({ apiStyle: 'cog', baseUrl: server.origin, token: undefined, ...overrides });

  test('runs a synchronous prediction with a client id, passing width and height', async () => {
    const seen: string[] = [];
    const result = await cogProvider().generate(request({ width: 640, height: 480, outputFormat: 'webp', seed: 7 }), noAbort(), {
      onPrediction: (id) => seen.push(id),
    });

    const [create] = server.requestsOf('cog-create');
    expect(create.method).toBe('PUT');
    expect(create.path).toBe(`/predictions/${seen[0]}`);
    expect(create.auth).toBe('none');
    expect(create.body).toEqual({
      id: seen[0],
      input: { prompt: 'a red fox in the snow', width: 640, height: 480, seed: 7, num_outputs: 1, output_format: 'webp' },
    });
    expect(seen[0]).toMatch(/^[a-z2-7]{26}$/);
    expect(result.predictionId).toBe(seen[0]);
    expect(result.predictTimeMs).toBe(1234);
    const meta = await sharp(result.images[0].data).metadata();
    expect([result.images[0].contentType, meta.width, meta.height]).toEqual(['image/webp', 640, 480]);
  });

  test('a 5xx is retried with the same id (idempotent PUT)', async () => {
    server.faults.push({ kind: 'server-error', route: 'cog-create', count: 1, status: 503 });
    const result = await cogProvider().generate(request(), noAbort());
    const creates = server.requestsOf('cog-create');
    expect(creates.map((r) => r.status)).toEqual([503, 200]);
    expect(creates[1].path).toBe(creates[0].path);
    expect(creates[1].path).toBe(`/predictions/${result.predictionId}`);
  });

  test('a failed NSFW prediction is permanent', async () => {
    server.setScenario({ outcome: { failed: 'NSFW content detected' } });
    const error = await providerError(cogProvider().generate(request(), noAbort()));
    expect(error.kind).toBe('permanent');
    expect(error.message).toMatch(/NSFW content detected/);
  });

  test('an abort cancels the Cog prediction', async () => {
    server.setScenario({ neverFinish: true });
    const controller = new AbortController();
    const settled = cogProvider()
      .generate(request(), controller.signal)
      .catch((e: unknown) => e);
    await server.waitForRequest((r) => r.route === 'cog-create');
    const reason = new Error('stop');
    controller.abort(reason);

    expect(await settled).toBe(reason);
    expect(server.requestsOf('cog-cancel').map((r) => r.path)).toEqual([`/predictions/${onlyPrediction().id}/cancel`]);
  });
});

describe('logging', () => {
  test('requests are logged at debug level and the token never appears', async () => {
    let text = '';
    const sink = new Writable({
      write(chunk: Buffer, _encoding, done) {
        text += chunk.toString();
        done();
      },
    });
    const logger = pino({ level: 'debug' }, sink);

    server.setScenario({ processingPolls: 1, preferWaitCapMs: 10 });
    server.faults.push({ kind: 'rate-limit', route: 'get', count: 1, retryAfter: 0.05 });
    await provider({ logger }).generate(request(), noAbort());
    server.faults.push({ kind: 'server-error', route: 'create', count: 1, status: 500 });
    const failure = await providerError(provider({ logger }).generate(request(), noAbort()));
    // A worker logging the error (with its cause) must not leak the token either.
    logger.error({ err: failure, cause: failure.cause }, 'job failed');
    const refused = await providerError(provider({ logger, token: `${server.token}-wrong` }).generate(request(), noAbort()));
    logger.error({ err: refused }, 'job failed');

    expect(text).toContain('"method":"POST"');
    expect(text).toContain('"status":201');
    expect(text).toContain('"predictionId"');
    expect(text).not.toContain(server.token);
    expect(text).not.toMatch(/Bearer/i);
  });
});
