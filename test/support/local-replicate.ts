// A local fake of Replicate's HTTP API (and of a Cog model server), on 127.0.0.1 and a free port, for
// tests. It speaks the wire format of Replicate's reference: predictions with id/model/version/input/
// logs/output/error/status/timestamps/urls/metrics, `Prefer: wait=n`, Bearer auth, `{title, detail,
// status}` error bodies, 429s with `retry_after` and `Retry-After`; it serves its outputs from its own
// "delivery" URLs, real images made with sharp. Faults are injected per test through `faults` and
// `setScenario()`, and every request is recorded (without its Authorization header) for assertions.
// Like Replicate, it can enforce a rate limit on prediction creates (`createLimit`: a token bucket of
// `burst` tokens refilled at `perMinute`): a create beyond it is a 429 with `retry_after`.
/* eslint-disable @typescript-eslint/no-base-to-string, @typescript-eslint/restrict-template-expressions -- a fake server
   turns whatever a client sent into text on purpose, as the real one does in its messages */
import { randomBytes } from 'node:crypto';
import { EventEmitter } from 'node:events';
import { createServer, type IncomingMessage, type ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';
import sharp from 'sharp';

export const FLUX_ASPECT_RATIOS = ['1:1', '16:9', '21:9', '3:2', '2:3', '4:5', '5:4', '3:4', '4:3', '9:16', '9:21'];

/** A model the fake knows: its name and the aspect ratios its input schema allows. */
export interface FakeModel {
  name: string;
  aspectRatios?: readonly string[];
}

export type Route = 'create-model' | 'create-version' | 'get' | 'cancel' | 'delivery' | 'cog-create' | 'cog-cancel' | 'other';
/** Which requests a fault applies to; 'create' is either create endpoint (Replicate or Cog). */
export type FaultRoute = Route | 'create' | 'any';

export type Fault =
  /** 429 with Replicate's throttling body (`retry_after` seconds) and, unless `header: false`, a Retry-After header. */
  | { kind: 'rate-limit'; route: FaultRoute; count: number; retryAfter?: number; header?: string | false; inBody?: boolean }
  /** A 5xx (default 503) with a problem body. */
  | { kind: 'server-error'; route: FaultRoute; count: number; status?: number; retryAfterHeader?: string }
  /** Reads the request, then destroys the connection without an answer. */
  | { kind: 'drop'; route: FaultRoute; count: number }
  /** Any status and JSON body. */
  | { kind: 'status'; route: FaultRoute; count: number; status: number; body: unknown };

export type Outcome = 'succeeded' | 'canceled' | 'aborted' | { failed: string };

export type DeliveryBehaviour =
  | 'image'
  | 'garbage'
  /** A too large Content-Length, the image's bytes, then nothing (the connection stays open). */
  | 'huge'
  /** No Content-Length, chunked bytes until the client goes away. */
  | 'huge-chunked'
  /** Content-Length of the whole image, half of it sent, then the connection dropped. */
  | 'truncated'
  /** 302 to the same host (allowed), which then serves the image. */
  | 'redirect-same-host'
  /** 302 to `foreignOrigin` (http://localhost:PORT, a host name the tests do not allow). */
  | 'redirect-foreign';

export interface OutputContext {
  id: string;
  index: number;
  origin: string;
  foreignOrigin: string;
  format: 'png' | 'webp' | 'jpeg';
  image: () => Promise<Buffer>;
}

export interface Scenario {
  /** How long the model runs, from creation (time-based progress). Default 10 ms. */
  runMs: number;
  /** If set: the prediction stays `processing` for this many GET polls instead (poll-based progress). */
  processingPolls?: number;
  /** Never finishes (until canceled). */
  neverFinish: boolean;
  outcome: Outcome;
  /** Hold `Prefer: wait` responses at most this long (a stand-in for "n seconds" so tests run fast). */
  preferWaitCapMs?: number;
  /** How outputs are given: delivery URLs, data: URIs, or anything a function returns (sync or async). */
  output: 'delivery' | 'data-uri' | ((ctx: OutputContext) => unknown); // may return a promise
  /** flux returns an array; some models a single string. */
  outputShape: 'array' | 'string';
  delivery: DeliveryBehaviour;
  /** Size for 'huge' / 'huge-chunked' deliveries. */
  hugeBytes: number;
  /** `metrics.predict_time`, seconds. */
  predictTime: number;
  /** tqdm's total steps in the logs. */
  steps: number;
}

const defaultScenario = (): Scenario => ({
  runMs: 10,
  neverFinish: false,
  outcome: 'succeeded',
  output: 'delivery',
  outputShape: 'array',
  delivery: 'image',
  hugeBytes: 8 * 1024 * 1024,
  predictTime: 1.234,
  steps: 4,
});

export interface RecordedRequest {
  /** Date.now() when the request arrived. */
  at: number;
  method: string;
  /** Path and query. */
  path: string;
  route: Route;
  /** Headers, without Authorization. */
  headers: Record<string, string | string[] | undefined>;
  /** What the Authorization header was: absent, the right Bearer token, or something else. */
  auth: 'none' | 'valid' | 'invalid';
  body: unknown;
  /** Status answered (set when the answer is sent; undefined for dropped connections). */
  status?: number;
  host: string;
}

interface FakePrediction {
  id: string;
  model: string;
  version: string;
  input: Record<string, unknown>;
  createdAt: number;
  startedAt?: number;
  completedAt?: number;
  status: 'starting' | 'processing' | 'succeeded' | 'failed' | 'canceled' | 'aborted';
  output: unknown;
  error: string | null;
  polls: number;
  completing?: boolean;
  scenario: Scenario;
  cog: boolean;
  timers: NodeJS.Timeout[];
  waiters: Set<() => void>;
}

/** Replicate's limit on creates: a token bucket of `burst` tokens refilled at `perMinute`. */
export interface CreateLimit {
  perMinute: number;
  burst: number;
}

export interface LocalReplicateOptions {
  token?: string;
  createLimit?: CreateLimit;
  models?: FakeModel[];
  /** Versions the fake knows (64 hex) and the model each belongs to. */
  versions?: Record<string, string>;
}

export interface LocalReplicate {
  /** http://127.0.0.1:PORT */
  origin: string;
  /** The same server under another host name (for "foreign host" tests). */
  foreignOrigin: string;
  /** origin + '/v1' — Replicate's base URL. */
  baseUrl: string;
  token: string;
  requests: RecordedRequest[];
  faults: Fault[];
  scenario: Scenario;
  setScenario(patch: Partial<Scenario>): void;
  /** The enforced create limit (undefined: none); may be changed between runs. */
  createLimit?: CreateLimit;
  predictions: Map<string, FakePrediction>;
  /** Requests of a route ('create' matches both create endpoints). */
  requestsOf(route: FaultRoute): RecordedRequest[];
  /** Resolves with the first recorded request matching `predicate` (already recorded or yet to come). */
  waitForRequest(predicate: (r: RecordedRequest) => boolean, timeoutMs?: number): Promise<RecordedRequest>;
  close(): Promise<void>;
}

export const DEFAULT_TOKEN = 'r8_local_test_token_0123456789abcdef';

export async function startLocalReplicate(options: LocalReplicateOptions = {}): Promise<LocalReplicate> {
  const token = options.token ?? DEFAULT_TOKEN;
  const models = new Map<string, FakeModel>((options.models ?? [{ name: 'black-forest-labs/flux-schnell' }]).map((m) => [m.name, m]));
  const versions = new Map(Object.entries(options.versions ?? {}));
  const events = new EventEmitter();
  const imageCache = new Map<string, Promise<Buffer>>();
  let origin = '';
  let foreignOrigin = '';

  const state: LocalReplicate = {
    origin: '',
    foreignOrigin: '',
    baseUrl: '',
    token,
    requests: [],
    faults: [],
    scenario: defaultScenario(),
    createLimit: options.createLimit,
    setScenario(patch) {
      state.scenario = { ...state.scenario, ...patch };
    },
    predictions: new Map(),
    requestsOf(route) {
      return state.requests.filter((r) => routeMatches(route, r.route));
    },
    waitForRequest(predicate, timeoutMs = 5000) {
      const found = state.requests.find(predicate);
      if (found) return Promise.resolve(found);
      return new Promise((resolve, reject) => {
        const timer = setTimeout(() => {
          events.off('request', listener);
          reject(new Error(`no matching request within ${timeoutMs} ms`));
        }, timeoutMs);
        const listener = (r: RecordedRequest) => {
          if (!predicate(r)) return;
          clearTimeout(timer);
          events.off('request', listener);
          resolve(r);
        };
        events.on('request', listener);
      });
    },
    async close() {
      for (const p of state.predictions.values()) {
        p.timers.forEach(clearTimeout);
        for (const wake of p.waiters) wake();
      }
      await new Promise<void>((resolve) => {
        server.close(() => resolve());
        server.closeAllConnections();
      });
    },
  };

  // ------------------------------------------------------------------ create limit

  const bucket = { tokens: 0, at: 0, limit: undefined as CreateLimit | undefined };
  /** Takes a create token; returns undefined, or the seconds until one is available. */
  function throttle(): number | undefined {
    const limit = state.createLimit;
    if (!limit) return undefined;
    const now = performance.now();
    const perMs = limit.perMinute / 60_000;
    if (bucket.limit !== limit) Object.assign(bucket, { tokens: limit.burst, at: now, limit }); // a new limit starts full
    bucket.tokens = Math.min(limit.burst, bucket.tokens + (now - bucket.at) * perMs);
    bucket.at = now;
    if (bucket.tokens >= 1) {
      bucket.tokens -= 1;
      return undefined;
    }
    return Math.ceil((1 - bucket.tokens) / perMs) / 1000;
  }

  // ------------------------------------------------------------------ predictions

  const predictionJson = (p: FakePrediction) => {
    advance(p);
    const base = `${origin}/v1/predictions/${p.id}`;
    const json: Record<string, unknown> = {
      id: p.id,
      model: p.model,
      version: p.version,
      input: p.input,
      logs: logsOf(p),
      output: p.output,
      data_removed: false,
      error: p.error,
      status: p.status,
      source: 'api',
      created_at: new Date(p.createdAt).toISOString(),
      urls: {
        get: base,
        cancel: `${base}/cancel`,
        stream: `${origin}/stream/${p.id}`,
        web: `${origin}/p/${p.id}`,
      },
    };
    if (p.startedAt) json.started_at = new Date(p.startedAt).toISOString();
    if (p.completedAt) {
      json.completed_at = new Date(p.completedAt).toISOString();
      if (p.status !== 'aborted') {
        json.metrics = { predict_time: p.scenario.predictTime, total_time: (p.completedAt - p.createdAt) / 1000 };
      }
    }
    return json;
  };

  const terminal = (p: FakePrediction) => ['succeeded', 'failed', 'canceled', 'aborted'].includes(p.status);

  /** How far along the model is, 0..1. */
  const fraction = (p: FakePrediction): number => {
    if (terminal(p)) return p.status === 'succeeded' ? 1 : 0;
    if (p.scenario.neverFinish) return Math.min(0.5, p.polls / 100);
    if (p.scenario.processingPolls !== undefined) return p.scenario.processingPolls === 0 ? 1 : p.polls / p.scenario.processingPolls;
    return p.scenario.runMs === 0 ? 1 : Math.min(1, (Date.now() - p.createdAt) / p.scenario.runMs);
  };

  const logsOf = (p: FakePrediction): string => {
    if (!p.startedAt) return '';
    const total = p.scenario.steps;
    const done = Math.floor(fraction(p) * total);
    const lines = [`Using seed: ${p.input.seed ?? 42}`, 'Running prediction'];
    for (let step = 0; step <= Math.min(done, total); step++) {
      const percent = Math.floor((step / total) * 100);
      const bar = '█'.repeat(Math.floor(percent / 10)).padEnd(10, ' ');
      lines.push(`${String(percent).padStart(3)}%|${bar}| ${step}/${total} [00:0${step}<00:00,  3.21it/s]`);
    }
    return lines.join('\n');
  };

  const complete = async (p: FakePrediction) => {
    if (terminal(p) || p.completing) return;
    p.completing = true;
    const outcome = p.scenario.outcome;
    const output = outcome === 'succeeded' ? await makeOutput(p) : null;
    if (terminal(p)) return; // canceled while the outputs were being made
    p.completedAt = Date.now();
    p.startedAt ??= p.createdAt;
    if (outcome === 'succeeded') {
      p.status = 'succeeded';
      p.output = output;
    } else if (typeof outcome === 'object') {
      p.status = 'failed';
      p.error = outcome.failed;
    } else {
      p.status = outcome;
    }
    wake(p);
  };

  const wake = (p: FakePrediction) => {
    for (const w of p.waiters) w();
    p.waiters.clear();
  };

  /** Moves a prediction on by the clock (time-based scenarios) — the poll-based ones move in GET. */
  function advance(p: FakePrediction): void {
    if (terminal(p)) return;
    if (!p.startedAt && Date.now() - p.createdAt >= 0) {
      p.startedAt = p.createdAt;
      p.status = 'processing';
    }
  }

  const formatOf = (p: FakePrediction): 'png' | 'webp' | 'jpeg' => {
    const f = p.input.output_format;
    return f === 'jpg' || f === 'jpeg' ? 'jpeg' : f === 'png' ? 'png' : 'webp';
  };

  const sizeOf = (p: FakePrediction): [number, number] => {
    if (typeof p.input.width === 'number' && typeof p.input.height === 'number') return [p.input.width, p.input.height];
    const [w, h] = String(p.input.aspect_ratio ?? '1:1')
      .split(':')
      .map(Number);
    const pixels = p.input.megapixels === '0.25' ? 512 * 512 : 1024 * 1024;
    const scale = Math.sqrt(pixels / (w * h));
    return [Math.round((w * scale) / 16) * 16, Math.round((h * scale) / 16) * 16];
  };

  const imageOf = (p: FakePrediction, index: number): Promise<Buffer> => {
    const key = `${p.id}/${index}`;
    let image = imageCache.get(key);
    if (!image) {
      const [width, height] = sizeOf(p);
      const hue = (index * 90) % 256;
      image = sharp({ create: { width, height, channels: 3, background: { r: hue, g: 120, b: 255 - hue } } })
        .toFormat(formatOf(p))
        .toBuffer();
      imageCache.set(key, image);
    }
    return image;
  };

  const extOf = (format: string) => (format === 'jpeg' ? 'jpg' : format);

  async function makeOutput(p: FakePrediction): Promise<unknown> {
    const count = typeof p.input.num_outputs === 'number' ? p.input.num_outputs : 1;
    const outputs: unknown[] = [];
    for (let index = 0; index < count; index++) {
      const format = formatOf(p);
      const ctx: OutputContext = { id: p.id, index, origin, foreignOrigin, format, image: () => imageOf(p, index) };
      const how = p.scenario.output;
      if (how === 'delivery') outputs.push(`${origin}/delivery/${p.id}/out-${index}.${extOf(format)}`);
      else if (how === 'data-uri') outputs.push(`data:image/${format};base64,${(await imageOf(p, index)).toString('base64')}`);
      else outputs.push(await how(ctx));
    }
    return p.scenario.outputShape === 'string' ? outputs[0] : outputs;
  }

  function createPrediction(model: string, version: string, input: Record<string, unknown>, cog: boolean, id?: string): FakePrediction {
    const p: FakePrediction = {
      id: id ?? [...randomBytes(26)].map((b) => 'abcdefghijklmnopqrstuvwxyz0123456789'[b % 36]).join(''),
      model,
      version,
      input,
      createdAt: Date.now(),
      status: 'starting',
      output: null,
      error: null,
      polls: 0,
      // Cog returns files as data: URIs unless told to upload them.
      scenario: cog && state.scenario.output === 'delivery' ? { ...state.scenario, output: 'data-uri' } : { ...state.scenario },
      cog,
      timers: [],
      waiters: new Set(),
    };
    state.predictions.set(p.id, p);
    const s = p.scenario;
    if (!s.neverFinish && s.processingPolls === undefined) {
      p.timers.push(setTimeout(() => void complete(p), s.runMs));
    } else if (!s.neverFinish && s.processingPolls === 0) {
      void complete(p);
    }
    return p;
  }

  /** Waits until the prediction is terminal, or `ms` passed, or the client went away. */
  function waitUntilDone(p: FakePrediction, ms: number, req: IncomingMessage): Promise<void> {
    if (terminal(p)) return Promise.resolve();
    return new Promise((resolve) => {
      const done = () => {
        clearTimeout(timer);
        p.waiters.delete(done);
        req.socket.off('close', done);
        resolve();
      };
      const timer = setTimeout(done, ms);
      p.waiters.add(done);
      req.socket.once('close', done);
    });
  }

  // ------------------------------------------------------------------ validation (flux-schnell's schema)

  function validate(model: FakeModel, input: Record<string, unknown>): { field: string; description: string }[] {
    const problems: { field: string; description: string }[] = [];
    const ratios = model.aspectRatios ?? FLUX_ASPECT_RATIOS;
    if (typeof input.prompt !== 'string' || input.prompt === '') problems.push({ field: 'input.prompt', description: 'prompt is required' });
    if (input.aspect_ratio !== undefined && !ratios.includes(String(input.aspect_ratio))) {
      problems.push({
        field: 'input.aspect_ratio',
        description: `aspect_ratio must be one of the following: ${ratios.map((r) => `"${r}"`).join(', ')}`,
      });
    }
    if (input.megapixels !== undefined && !['1', '0.25'].includes(String(input.megapixels))) {
      problems.push({ field: 'input.megapixels', description: 'megapixels must be one of the following: "1", "0.25"' });
    }
    if (input.output_format !== undefined && !['webp', 'jpg', 'png'].includes(String(input.output_format))) {
      problems.push({ field: 'input.output_format', description: 'output_format must be one of the following: "webp", "jpg", "png"' });
    }
    const n = input.num_outputs;
    if (n !== undefined && !(Number.isInteger(n) && (n as number) >= 1 && (n as number) <= 4)) {
      problems.push({ field: 'input.num_outputs', description: 'num_outputs must be between 1 and 4' });
    }
    if (input.seed !== undefined && !Number.isInteger(input.seed)) problems.push({ field: 'input.seed', description: 'seed must be an integer' });
    return problems;
  }

  // ------------------------------------------------------------------ HTTP

  const sendJson = (res: ServerResponse, record: RecordedRequest, status: number, body: unknown, headers: Record<string, string> = {}) => {
    record.status = status;
    const text = JSON.stringify(body);
    const problem = status >= 400 && !record.route.startsWith('cog');
    res.writeHead(status, {
      'content-type': problem ? 'application/problem+json' : 'application/json',
      'content-length': Buffer.byteLength(text),
      ...headers,
    });
    res.end(text);
  };

  const problem = (status: number, title: string, detail: string, extra: Record<string, unknown> = {}) => ({ title, detail, status, ...extra });

  const routeOf = (method: string, path: string): Route => {
    if (method === 'POST' && /^\/v1\/models\/[^/]+\/[^/]+\/predictions$/.test(path)) return 'create-model';
    if (method === 'POST' && path === '/v1/predictions') return 'create-version';
    if (method === 'GET' && /^\/v1\/predictions\/[^/]+$/.test(path)) return 'get';
    if (method === 'POST' && /^\/v1\/predictions\/[^/]+\/cancel$/.test(path)) return 'cancel';
    if (method === 'GET' && path.startsWith('/delivery/')) return 'delivery';
    if ((method === 'POST' && path === '/predictions') || (method === 'PUT' && /^\/predictions\/[^/]+$/.test(path))) return 'cog-create';
    if (method === 'POST' && /^\/predictions\/[^/]+\/cancel$/.test(path)) return 'cog-cancel';
    return 'other';
  };

  function routeMatches(wanted: FaultRoute, route: Route): boolean {
    if (wanted === 'any') return true;
    if (wanted === 'create') return route === 'create-model' || route === 'create-version' || route === 'cog-create';
    return wanted === route;
  }

  function takeFault(route: Route): Fault | undefined {
    const index = state.faults.findIndex((f) => f.count > 0 && routeMatches(f.route, route));
    if (index < 0) return undefined;
    const fault = state.faults[index];
    fault.count -= 1;
    return fault;
  }

  async function readBody(req: IncomingMessage): Promise<unknown> {
    const chunks: Buffer[] = [];
    for await (const chunk of req) chunks.push(chunk as Buffer);
    const text = Buffer.concat(chunks).toString('utf8');
    if (!text) return undefined;
    try {
      return JSON.parse(text);
    } catch {
      return text;
    }
  }

  async function handle(req: IncomingMessage, res: ServerResponse): Promise<void> {
    const url = new URL(req.url ?? '/', origin);
    const method = req.method ?? 'GET';
    const route = routeOf(method, url.pathname);
    const { authorization, ...headers } = req.headers;
    const body = await readBody(req);
    const record: RecordedRequest = {
      at: Date.now(),
      method,
      path: url.pathname + url.search,
      route,
      headers,
      auth: authorization === undefined ? 'none' : authorization === `Bearer ${token}` ? 'valid' : 'invalid',
      body,
      host: req.headers.host ?? '',
    };
    state.requests.push(record);
    events.emit('request', record);

    const fault = takeFault(route);
    if (fault) {
      switch (fault.kind) {
        case 'rate-limit': {
          const seconds = fault.retryAfter ?? 1;
          const header: Record<string, string> = fault.header === false ? {} : { 'retry-after': fault.header ?? String(Math.max(1, Math.ceil(seconds))) };
          return sendJson(
            res,
            record,
            429,
            problem(
              429,
              'Request was throttled',
              `Request was throttled. Expected available in ${seconds} second${seconds === 1 ? '' : 's'}.`,
              fault.inBody === false ? {} : { retry_after: seconds },
            ),
            header,
          );
        }
        case 'server-error': {
          const status = fault.status ?? 503;
          return sendJson(
            res,
            record,
            status,
            problem(status, 'Service Unavailable', 'The service is temporarily unavailable.'),
            fault.retryAfterHeader ? { 'retry-after': fault.retryAfterHeader } : {},
          );
        }
        case 'drop':
          req.socket.destroy();
          return;
        case 'status':
          return sendJson(res, record, fault.status, fault.body);
      }
    }

    if (route === 'delivery') return deliver(url, req, res, record);
    if (route === 'cog-create' || route === 'cog-cancel') return cog(route, url, req, res, record, body);

    if (route !== 'other' && record.auth !== 'valid') {
      return sendJson(res, record, 401, problem(401, 'Unauthenticated', 'You did not pass a valid authentication token'));
    }

    switch (route) {
      case 'create-model':
      case 'create-version': {
        const throttled = throttle();
        if (throttled !== undefined) {
          const whole = Math.max(1, Math.ceil(throttled));
          return sendJson(
            res,
            record,
            429,
            problem(429, 'Request was throttled', `Request was throttled. Expected available in ${whole} second${whole === 1 ? '' : 's'}.`, {
              retry_after: throttled,
            }),
            { 'retry-after': String(whole) },
          );
        }
        let modelName: string;
        let version = 'hidden';
        const request = (body ?? {}) as { input?: Record<string, unknown>; version?: string };
        if (route === 'create-model') {
          const [, , , owner, name] = url.pathname.split('/');
          modelName = `${owner}/${name}`;
        } else {
          const raw = String(request.version ?? '');
          const id = raw.includes(':') ? raw.split(':')[1] : raw;
          const owner = versions.get(id);
          if (!owner) return sendJson(res, record, 404, problem(404, 'Not found', 'The requested resource could not be found.'));
          modelName = owner;
          version = id;
        }
        const model = models.get(modelName);
        if (!model) return sendJson(res, record, 404, problem(404, 'Not found', 'The requested resource could not be found.'));
        if (!request.input || typeof request.input !== 'object') {
          return sendJson(res, record, 422, problem(422, 'Input validation failed', '- input: input is required', { invalid_fields: [] }));
        }
        const problems = validate(model, request.input);
        if (problems.length > 0) {
          return sendJson(
            res,
            record,
            422,
            problem(422, 'Input validation failed', problems.map((p) => `- ${p.field}: ${p.description}`).join('\n'), {
              invalid_fields: problems.map((p) => ({ type: 'invalid', field: p.field, description: p.description })),
            }),
          );
        }
        const prefer = req.headers.prefer;
        let waitMs = 0;
        if (prefer !== undefined) {
          const match = /^wait(?:=(\d+))?$/.exec(String(prefer).trim());
          const seconds = match ? (match[1] === undefined ? 60 : Number(match[1])) : NaN;
          if (!(seconds >= 1 && seconds <= 60)) {
            return sendJson(
              res,
              record,
              400,
              problem(400, 'Invalid Prefer header', `Prefer must be "wait" or "wait=n" with n from 1 to 60, got ${JSON.stringify(prefer)}`),
            );
          }
          waitMs = Math.min(seconds * 1000, state.scenario.preferWaitCapMs ?? Infinity);
        }
        const p = createPrediction(modelName, version, request.input, false);
        if (waitMs > 0) await waitUntilDone(p, waitMs, req);
        if (res.destroyed) return;
        return sendJson(res, record, 201, predictionJson(p));
      }
      case 'get': {
        const id = url.pathname.split('/')[3];
        const p = state.predictions.get(id);
        if (!p) return sendJson(res, record, 404, problem(404, 'Not found', 'The requested resource could not be found.'));
        p.polls += 1;
        advance(p);
        const s = p.scenario;
        if (!terminal(p) && !s.neverFinish && s.processingPolls !== undefined && p.polls >= s.processingPolls) await complete(p);
        return sendJson(res, record, 200, predictionJson(p));
      }
      case 'cancel': {
        const id = url.pathname.split('/')[3];
        const p = state.predictions.get(id);
        if (!p) return sendJson(res, record, 404, problem(404, 'Not found', 'The requested resource could not be found.'));
        cancelPrediction(p);
        return sendJson(res, record, 200, predictionJson(p));
      }
      default:
        return sendJson(res, record, 404, problem(404, 'Not found', 'The requested resource could not be found.'));
    }
  }

  function cancelPrediction(p: FakePrediction): void {
    if (terminal(p)) return;
    p.timers.forEach(clearTimeout);
    p.status = p.startedAt ? 'canceled' : 'aborted';
    p.completedAt = Date.now();
    wake(p);
  }

  // ------------------------------------------------------------------ Cog

  async function cog(route: Route, url: URL, req: IncomingMessage, res: ServerResponse, record: RecordedRequest, body: unknown): Promise<void> {
    const parts = url.pathname.split('/');
    if (route === 'cog-cancel') {
      const p = state.predictions.get(parts[2]);
      if (!p) return sendJson(res, record, 404, { detail: 'Not Found' });
      cancelPrediction(p);
      return sendJson(res, record, 200, {});
    }
    const request = (body ?? {}) as { id?: string; input?: Record<string, unknown> };
    const id = req.method === 'PUT' ? parts[2] : request.id;
    if (req.method === 'PUT' && request.id !== undefined && request.id !== id) {
      return sendJson(res, record, 422, { detail: [{ loc: ['body', 'id'], msg: 'prediction ID must match the ID supplied in the URL', type: 'value_error' }] });
    }
    const input = request.input ?? {};
    const errors: { loc: string[]; msg: string; type: string }[] = [];
    for (const key of ['width', 'height'] as const) {
      if (input[key] !== undefined && !Number.isInteger(input[key]))
        errors.push({ loc: ['body', 'input', key], msg: 'value is not a valid integer', type: 'type_error.integer' });
    }
    if (typeof input.prompt !== 'string') errors.push({ loc: ['body', 'input', 'prompt'], msg: 'field required', type: 'value_error.missing' });
    if (errors.length > 0) return sendJson(res, record, 422, { detail: errors });
    const existing = id ? state.predictions.get(id) : undefined;
    const p = existing ?? createPrediction('', '', input, true, id);
    await waitUntilDone(p, 10 * 60_000, req);
    if (res.destroyed) return;
    advance(p);
    const json = {
      id: p.id,
      input: p.input,
      output: p.output,
      error: p.error,
      logs: logsOf(p),
      status: p.status,
      created_at: new Date(p.createdAt).toISOString(),
      started_at: p.startedAt ? new Date(p.startedAt).toISOString() : null,
      completed_at: p.completedAt ? new Date(p.completedAt).toISOString() : null,
      metrics: { predict_time: p.scenario.predictTime },
    };
    return sendJson(res, record, 200, json);
  }

  // ------------------------------------------------------------------ delivery

  async function deliver(url: URL, req: IncomingMessage, res: ServerResponse, record: RecordedRequest): Promise<void> {
    const [, , id, file] = url.pathname.split('/');
    const p = state.predictions.get(id);
    const index = Number(/^out-(\d+)\./.exec(file ?? '')?.[1] ?? NaN);
    if (!p || !Number.isInteger(index)) {
      record.status = 404;
      res.writeHead(404, { 'content-type': 'text/plain' }).end('not found');
      return;
    }
    const image = await imageOf(p, index);
    const contentType = `image/${formatOf(p)}`;
    const behaviour = url.searchParams.has('final') ? 'image' : p.scenario.delivery;
    switch (behaviour) {
      case 'image':
        record.status = 200;
        res.writeHead(200, { 'content-type': contentType, 'content-length': image.length });
        res.end(image);
        return;
      case 'garbage': {
        const junk = Buffer.from('<html><body>Service temporarily unavailable</body></html>');
        record.status = 200;
        res.writeHead(200, { 'content-type': contentType, 'content-length': junk.length });
        res.end(junk);
        return;
      }
      case 'truncated':
        record.status = 200;
        res.writeHead(200, { 'content-type': contentType, 'content-length': image.length });
        res.write(image.subarray(0, Math.floor(image.length / 2)), () => setTimeout(() => res.destroy(), 5));
        return;
      case 'redirect-same-host':
      case 'redirect-foreign': {
        const target = behaviour === 'redirect-same-host' ? origin : foreignOrigin;
        record.status = 302;
        res.writeHead(302, { location: `${target}${url.pathname}?final=1`, 'content-length': 0 });
        res.end();
        return;
      }
      case 'huge':
        // Announces more than a client should accept, sends a first chunk, then stalls: only a client that
        // goes by the Content-Length stops at once (one that waits for the bytes hangs until its timeout).
        record.status = 200;
        res.writeHead(200, { 'content-type': contentType, 'content-length': p.scenario.hugeBytes });
        res.write(image);
        return;
      case 'huge-chunked': {
        record.status = 200;
        const total = p.scenario.hugeBytes;
        res.writeHead(200, { 'content-type': contentType });
        const chunk = Buffer.alloc(64 * 1024, 0);
        image.copy(chunk, 0, 0, Math.min(image.length, chunk.length));
        let sent = 0;
        const pump = () => {
          while (sent < total && !res.destroyed) {
            const piece = sent === 0 ? chunk : Buffer.alloc(Math.min(chunk.length, total - sent), 0);
            sent += piece.length;
            if (!res.write(piece)) {
              res.once('drain', pump);
              return;
            }
          }
          if (!res.destroyed) res.end();
        };
        req.socket.once('close', () => res.removeAllListeners('drain'));
        pump();
        return;
      }
    }
  }

  const server = createServer((req, res) => {
    handle(req, res).catch((error: unknown) => {
      if (!res.headersSent) {
        res.writeHead(500, { 'content-type': 'text/plain' });
        res.end(String(error));
      } else {
        res.destroy();
      }
    });
  });
  server.keepAliveTimeout = 1000;
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const { port } = server.address() as AddressInfo;
  origin = `http://127.0.0.1:${port}`;
  foreignOrigin = `http://localhost:${port}`;
  state.origin = origin;
  state.foreignOrigin = foreignOrigin;
  state.baseUrl = `${origin}/v1`;
  return state;
}
