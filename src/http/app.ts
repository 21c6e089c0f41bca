// createApp(deps): the HTTP API. Requests (and, in tests, responses) are validated against openapi.yaml.
import { randomUUID } from 'node:crypto';
import express, { type Express, type Response } from 'express';
import * as OpenApiValidator from 'express-openapi-validator';
import { sql } from 'kysely';
import { pinoHttp } from 'pino-http';
import swaggerUi from 'swagger-ui-express';
import { AppError } from '../errors.ts';
import type { JobEventHub } from '../jobs/job.events.ts';
import { cancelJob, getJobStatus, listJobs, submitJob, type GenerateRequest, type JobServiceDeps, type ListQuery } from '../jobs/job.service.ts';
import type { Logger } from '../logger.ts';
import type { MediaStorage } from '../media/storage.ts';
import type { Metrics } from '../metrics.ts';
import { getWebhookSecret } from '../webhooks/webhook.service.ts';
import { spec, specPath, specText } from './contract.ts';
import { corsPolicy } from './cors.ts';
import { streamJobEvents } from './job-events.stream.ts';
import { errorHandler, notFoundHandler, RETRY_AFTER_SECONDS, sendProblem } from './problem.ts';

export interface AppDeps extends JobServiceDeps {
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
  app.disable('x-powered-by');
  app.set('query parser', 'simple');
  app.use(corsPolicy(deps.corsOrigins));

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

  app.use(express.json({ limit: deps.maxBodyBytes, strict: true, type: 'application/json' }));
  app.use(
    OpenApiValidator.middleware({
      apiSpec: specPath,
      validateRequests: { allowUnknownQueryParameters: false, allErrors: true },
      validateResponses: deps.validateResponses ?? false,
      ignorePaths: /^\/docs(\/|$)/,
      validateFormats: true,
    }),
  );

  app.post('/generate', async (req, res) => {
    const { job, created } = await submitJob(deps, req.body as GenerateRequest, req.header('idempotency-key'));
    res
      .status(created ? 202 : 200)
      .location(`/status/${job.id}`)
      .json({ job_id: job.id, status: job.status });
  });

  app.get('/status/:job_id', async (req, res) => {
    res.json(await getJobStatus(deps.db, req.params.job_id));
  });

  app.get('/jobs', async (req, res) => {
    res.json(await listJobs(deps.db, req.query as ListQuery));
  });

  app.get('/jobs/:job_id', async (req, res) => {
    res.json(await getJobStatus(deps.db, req.params.job_id));
  });

  app.post('/jobs/:job_id/cancel', async (req, res) => {
    res.json(await cancelJob(deps, req.params.job_id));
  });

  app.get('/jobs/:job_id/events', async (req, res) => {
    await streamJobEvents({ db: deps.db, events: deps.events, streams }, req, res);
  });

  app.get('/webhooks/secret', async (_req, res) => {
    res.json({ key: await getWebhookSecret(deps.db, deps.webhookConfig.WEBHOOK_SECRET) });
  });

  app.get('/media/:file', (req, res, next) => {
    res.sendFile(req.params.file, { root: deps.storage.dir, dotfiles: 'deny', maxAge: '365d', immutable: true, etag: true, lastModified: true }, (err) => {
      if (!err) return;
      if ((err as NodeJS.ErrnoException).code === 'ENOENT' || (err as { status?: number }).status === 404) {
        if (!res.headersSent) return next(new AppError('not_found', `no media file ${req.params.file}`));
      }
      next(err);
    });
  });

  app.get('/metrics', async (_req, res) => {
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
      for (const res of streams) res.end();
      streams.clear();
    },
  };
}
