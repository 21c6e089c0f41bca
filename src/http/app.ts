// createApp(deps): the HTTP API. Requests (and, in tests, responses) are validated against openapi.yaml.
import { randomUUID } from 'node:crypto';
import { fileURLToPath } from 'node:url';
import express, { type Express, type Response } from 'express';
import * as OpenApiValidator from 'express-openapi-validator';
import helmet from 'helmet';
import { sql } from 'kysely';
import { createAuthenticator, principalOf, requirePrincipal, type AuthConfig } from '../auth/authenticate.ts';
import { createRateLimiter, createStreamSlots, type LimitsConfig } from '../auth/limits.ts';
import { pinoHttp } from 'pino-http';
import swaggerUi from 'swagger-ui-express';
import { AppError } from '../errors.ts';
import type { JobEventHub } from '../jobs/job.events.ts';
import { findJobOwner } from '../jobs/job.repository.ts';
import { cancelJob, getJobStatus, listJobs, submitJob, type GenerateRequest, type JobServiceDeps } from '../jobs/job.service.ts';
import type { Logger } from '../logger.ts';
import type { MediaStorage } from '../media/storage.ts';
import type { Metrics } from '../metrics.ts';
import { getWebhookSecret } from '../webhooks/webhook.service.ts';
import { spec, specPath, specText } from './contract.ts';
import { corsPolicy } from './cors.ts';
import { streamJobEvents } from './job-events.stream.ts';
import { sendStoredMedia } from './media-stream.ts';
import { createQueuePositions } from './queue-positions.ts';
import { errorHandler, notFoundHandler, RETRY_AFTER_SECONDS, sendProblem } from './problem.ts';

const pageDir = fileURLToPath(new URL('./page/', import.meta.url));

export interface AppDeps extends Omit<JobServiceDeps, 'maxQueuedJobs'> {
  /** Keys and per-key limits (README "Security"). */
  security: AuthConfig & LimitsConfig;
  storage: MediaStorage;
  logger: Logger;
  events: JobEventHub;
  metrics: Metrics;
  maxBodyBytes: number;
  /** Origins allowed to call from a browser (CORS_ORIGINS); undefined = loopback pages only. */
  corsOrigins?: readonly string[];
  /** Validate every response against the contract (on in tests: a drift is a 500 there). */
  validateResponses?: boolean;
}

export interface App {
  express: Express;
  /** Ends the open event streams (on shutdown, so the server can close). */
  closeStreams(): void;
}

export function createApp(deps: AppDeps): App {
  const app = express();
  const streams = new Set<Response>();
  const jobDeps: JobServiceDeps = { ...deps, maxQueuedJobs: deps.security.KEY_MAX_QUEUED_JOBS };
  const positions = createQueuePositions(deps.db, deps.events, deps.logger);
  const streamSlots = createStreamSlots(deps.security.KEY_MAX_EVENT_STREAMS);
  app.disable('x-powered-by');
  app.set('query parser', 'simple');
  app.use(corsPolicy(deps.corsOrigins));
  // Security headers on every answer (nosniff, frame and referrer policies, …). The CSP allows this
  // origin's own scripts and styles plus inline styles, which /docs (swagger-ui, served from here)
  // needs; no upgrade-insecure-requests, since the service is often reached over plain HTTP.
  app.use(helmet({ contentSecurityPolicy: { directives: { upgradeInsecureRequests: null } } }));

  app.use(
    pinoHttp({
      logger: deps.logger,
      genReqId: (req, res) => {
        const given = req.headers['x-request-id'];
        const id = typeof given === 'string' && /^[\w.:-]{1,128}$/.test(given) ? given : randomUUID();
        res.setHeader('X-Request-Id', id);
        return id;
      },
      customLogLevel: (_req, res, err) => (err || res.statusCode >= 500 ? 'error' : res.statusCode >= 400 ? 'info' : 'debug'),
      quietReqLogger: true,
    }),
  );

  app.get('/openapi.yaml', (_req, res) => {
    res.type('application/yaml').send(specText);
  });
  app.use('/docs', swaggerUi.serve, swaggerUi.setup(spec, { customSiteTitle: 'Media generation API' }));
  // The web page (src/http/page): static files, public like /docs; it calls the API like any client.
  app.get('/', (_req, res) => res.sendFile('index.html', { root: pageDir }));
  app.use('/page', express.static(pageDir, { index: false }));

  // Who is calling, before anything reads the body; the contract says which routes need a key.
  app.use(createAuthenticator({ db: deps.db, config: deps.security, spec }));
  app.use(createRateLimiter(deps.db, deps.security));
  app.use(express.json({ limit: deps.maxBodyBytes, strict: true, type: 'application/json' }));
  app.use(
    OpenApiValidator.middleware({
      apiSpec: specPath,
      validateRequests: { allowUnknownQueryParameters: false, allErrors: true },
      validateResponses: deps.validateResponses ?? false,
      ignorePaths: /^\/docs(\/|$)/,
      validateFormats: true,
      validateSecurity: false, // the authenticator (src/auth) enforces the contract's security
      // Full checks: a date-time with hour 25, February 30 or a +24:00 offset is a 400, not a 500 later.
      ajvFormats: { mode: 'full' },
    }),
  );

  app.post('/generate', async (req, res) => {
    const { job, created } = await submitJob(jobDeps, requirePrincipal(res), req.body as GenerateRequest, req.header('idempotency-key'));
    res
      .status(created ? 202 : 200)
      .location(`/status/${job.id}`)
      .json({ job_id: job.id, status: job.status });
  });

  app.get('/status/:job_id', async (req, res) => {
    res.json(await getJobStatus(deps.db, requirePrincipal(res), req.params.job_id));
  });

  app.get('/jobs', async (req, res) => {
    res.json(await listJobs(deps.db, requirePrincipal(res), req.query));
  });

  app.get('/jobs/:job_id', async (req, res) => {
    res.json(await getJobStatus(deps.db, requirePrincipal(res), req.params.job_id));
  });

  app.post('/jobs/:job_id/cancel', async (req, res) => {
    res.json(await cancelJob(jobDeps, requirePrincipal(res), req.params.job_id));
  });

  app.get('/jobs/:job_id/events', async (req, res) => {
    const principal = requirePrincipal(res);
    const release = streamSlots.acquire(principal);
    res.on('close', release);
    try {
      await streamJobEvents({ db: deps.db, events: deps.events, positions, streams }, principal, req, res);
    } catch (err) {
      release();
      throw err;
    }
  });

  app.get('/webhooks/secret', async (_req, res) => {
    res.json({ key: await getWebhookSecret(deps.db, requirePrincipal(res).keyId, deps.webhookConfig.WEBHOOK_SECRET) });
  });

  // Media URLs are capabilities (unguessable names; <img> cannot send a key): served to whoever holds
  // one, privately cacheable. A request that does carry a key gets only that key's files (404 otherwise).
  app.get('/media/:file', async (req, res, next) => {
    const principal = principalOf(res);
    if (principal && !principal.local && !principal.operator) {
      const jobId = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}/.exec(req.params.file)?.[0];
      if (!jobId || (await findJobOwner(deps.db, jobId)) !== principal.keyId) return next(new AppError('not_found', `no media file ${req.params.file}`));
    }
    // Private: a shared cache must not hand one key's image to another. Embeddable from other origins (<img>).
    res.set({ 'Cache-Control': 'private, max-age=31536000, immutable', 'Cross-Origin-Resource-Policy': 'cross-origin' });
    if (deps.storage.kind === 's3') {
      if (!(await sendStoredMedia(deps.storage, req.params.file, req, res))) next(new AppError('not_found', `no media file ${req.params.file}`));
      return;
    }
    res.sendFile(req.params.file, { root: deps.storage.dir, dotfiles: 'deny', cacheControl: false, etag: true, lastModified: true }, (err) => {
      if (!err) return;
      if ((err as NodeJS.ErrnoException).code === 'ENOENT' || (err as { status?: number }).status === 404) {
        if (!res.headersSent) return next(new AppError('not_found', `no media file ${req.params.file}`));
      }
      next(err);
    });
  });

  app.get('/metrics', async (_req, res) => {
    const principal = requirePrincipal(res);
    if (!principal.operator && !principal.local) throw new AppError('forbidden', 'metrics are for operator keys (or the metrics port of a worker)');
    res.type(deps.metrics.registry.contentType).send(await deps.metrics.registry.metrics());
  });

  app.get('/healthz', (_req, res) => {
    res.json({ status: 'ok' });
  });

  app.get('/readyz', async (_req, res) => {
    try {
      await sql`select 1`.execute(deps.db);
      res.json({ status: 'ok' });
    } catch {
      res.set('Retry-After', String(RETRY_AFTER_SECONDS));
      sendProblem(res, { status: 503, detail: 'the database is not reachable', type: 'urn:problem:unavailable' });
    }
  });

  app.use(notFoundHandler);
  app.use(errorHandler);
  return {
    express: app,
    closeStreams: () => {
      positions.close();
      for (const res of streams) res.end();
      streams.clear();
    },
  };
}
