// Maps every error to RFC 9457 problem+json. Client mistakes become 4xx naming the field; an
// unreachable database becomes 503 with Retry-After; anything else is a logged 500 with no internals.
import type { IncomingMessage, ServerResponse } from 'node:http';
import type { Duplex } from 'node:stream';
import type { ErrorRequestHandler, RequestHandler, Response } from 'express';
import { AppError, isDatabaseUnavailable, isUnstorableText, type FieldError } from '../errors.ts';
import { parameterErrors } from '../jobs/parameters.ts';

export interface Problem {
  type: string;
  title: string;
  status: number;
  detail?: string;
  instance?: string;
  errors?: FieldError[];
}

export interface ProblemInput extends Partial<Problem> {
  status: number;
  /** Extension members, e.g. the unchanged `job` of a 409. */
  extensions?: Record<string, unknown>;
}

const titles: Partial<Record<number, string>> = {
  400: 'Bad Request',
  401: 'Unauthorized',
  403: 'Forbidden',
  404: 'Not Found',
  405: 'Method Not Allowed',
  406: 'Not Acceptable',
  409: 'Conflict',
  413: 'Content Too Large',
  408: 'Request Timeout',
  415: 'Unsupported Media Type',
  417: 'Expectation Failed',
  422: 'Unprocessable Content',
  429: 'Too Many Requests',
  431: 'Request Header Fields Too Large',
  500: 'Internal Server Error',
  503: 'Service Unavailable',
};

// One `type` per kind of error, whichever layer found it (AppError codes use the same names).
const kinds: Record<number, string> = {
  400: 'validation_failed',
  404: 'not_found',
  405: 'method_not_allowed',
  406: 'not_acceptable',
  408: 'request_timeout',
  413: 'payload_too_large',
  415: 'unsupported_media_type',
  417: 'expectation_failed',
  431: 'headers_too_large',
  500: 'internal',
  503: 'unavailable',
};

function problemType(status: number): string {
  return kinds[status] ? `urn:problem:${kinds[status]}` : 'about:blank';
}

/** What a client should send, for the details of 400 (no body), 413 and 415. */
const SEND_INSTEAD = 'send a JSON object such as {"prompt": "a lighthouse at dusk"} with Content-Type: application/json';

export function sendProblem(res: Response, problem: ProblemInput): void {
  const body: Problem & Record<string, unknown> = {
    type: problem.type ?? problemType(problem.status),
    title: problem.title ?? titles[problem.status] ?? 'Error',
    status: problem.status,
    ...(problem.detail ? { detail: problem.detail } : {}),
    ...(problem.instance ? { instance: problem.instance } : {}),
    ...(problem.errors?.length ? { errors: problem.errors } : {}),
    ...problem.extensions,
  };
  res.status(problem.status).type('application/problem+json').send(JSON.stringify(body));
}

export const RETRY_AFTER_SECONDS = 5;

export const notFoundHandler: RequestHandler = (req, res) => {
  sendProblem(res, { status: 404, detail: `no route for ${req.method} ${req.path}` });
};

interface HttpishError {
  status?: number;
  statusCode?: number;
  type?: string;
  message?: string;
  errors?: { path?: string; message?: string }[];
}

export const errorHandler: ErrorRequestHandler = (err, req, res, _next) => {
  if (res.headersSent) {
    req.log.warn({ err }, 'error after the response started');
    res.destroy();
    return;
  }
  if (err instanceof AppError) {
    if (err.status === 503 || err.retryAfterSeconds !== undefined) res.set('Retry-After', String(err.retryAfterSeconds ?? RETRY_AFTER_SECONDS));
    return sendProblem(res, { extensions: err.extensions, status: err.status, detail: err.message, errors: err.errors, type: `urn:problem:${err.code}` });
  }
  if (isDatabaseUnavailable(err)) {
    req.log.warn({ err }, 'database unavailable');
    res.set('Retry-After', String(RETRY_AFTER_SECONDS));
    return sendProblem(res, { status: 503, detail: 'the database is not reachable right now; retry shortly', type: 'urn:problem:unavailable' });
  }
  if (isUnstorableText(err)) {
    req.log.info({ err }, 'request text the database cannot store');
    return sendProblem(res, {
      status: 400,
      type: 'urn:problem:validation_failed',
      detail: 'the request holds text that cannot be stored (such as a NUL character)',
      errors: [{ path: '/body', message: 'holds characters that cannot be stored (such as NUL)' }],
    });
  }
  const e = err as HttpishError;
  const status = e.status ?? e.statusCode;
  const hasBody = Number(req.headers['content-length']) > 0 || req.headers['transfer-encoding'] !== undefined;
  const noBody = () =>
    sendProblem(res, { status: 400, detail: `the request has no body: ${SEND_INSTEAD}`, errors: [{ path: '/body', message: `is missing: ${SEND_INSTEAD}` }] });
  // body-parser errors
  if (e.type === 'entity.too.large') {
    const limit = (err as { limit?: number }).limit;
    return sendProblem(res, {
      status: 413,
      detail: `the request body is larger than the limit${limit ? ` of ${limit} bytes` : ''}: send only the fields of the contract (a prompt is at most 2000 characters; parameters are a few numbers)`,
    });
  }
  if (e.type === 'entity.parse.failed')
    return sendProblem(res, { status: 400, detail: `the body is not valid JSON: ${e.message}`, errors: [{ path: '/body', message: 'is not valid JSON' }] });
  if (e.type === 'encoding.unsupported' || e.type === 'charset.unsupported')
    return sendProblem(res, { status: 415, detail: `${e.message}: send UTF-8 JSON with Content-Type: application/json` });
  // express-openapi-validator errors carry a status and per-field errors
  if (status === 415) {
    if (!hasBody) return noBody();
    const given = req.headers['content-type'];
    return sendProblem(res, { status, detail: `${given ? `Content-Type ${given} is not accepted` : 'the request has no Content-Type'}: ${SEND_INSTEAD}` });
  }
  if (typeof status === 'number' && status >= 400 && status < 500) {
    let errors = (e.errors ?? []).map((fe) => ({ path: fe.path ?? '', message: fe.message ?? 'is invalid' }));
    if (!hasBody && errors.some((fe) => fe.path === '/body' || fe.path.startsWith('/body/'))) return noBody();
    errors = cleanParameterErrors(errors, (req.body as { parameters?: unknown } | undefined)?.parameters);
    const detail = errors.length ? errors.map((fe) => `${fe.path} ${fe.message}`).join('; ') : (e.message ?? titles[status]);
    if (status === 405) res.set('Allow', (err as { headers?: Record<string, string> }).headers?.Allow ?? '');
    return sendProblem(res, { status, detail, errors });
  }
  req.log.error({ err }, 'unhandled error');
  sendProblem(res, { status: 500, detail: 'an unexpected error occurred; it has been logged' });
};

/**
 * The validator checks `parameters` against a `oneOf` (object or string) and reports every branch's
 * failure ("must be string", "must match exactly one schema in oneOf"). Replace those with the one
 * validation both forms share, so a typo reads the same whichever form was sent.
 */
function cleanParameterErrors(errors: FieldError[], parameters: unknown): FieldError[] {
  const at = errors.findIndex((fe) => fe.path === '/body/parameters' || fe.path.startsWith('/body/parameters/'));
  if (at < 0) return errors;
  const others = errors.filter((fe) => !(fe.path === '/body/parameters' || fe.path.startsWith('/body/parameters/')));
  const clean = parameterErrors(parameters);
  return [...others.slice(0, at), ...(clean.length ? clean : errors.filter((fe) => !others.includes(fe))), ...others.slice(at)];
}

// Requests Node's HTTP parser refuses never reach express; by default Node answers them with a bare
// 400/431/417 and drops CONNECT. These answer them as problem+json like everything else. Wire them to the
// server: server.on('clientError', answerClientError); server.on('connect', answerConnect);
// server.on('checkExpectation', answerExpectation).

function rawProblem(status: number, detail: string, extraHeaders = ''): string {
  const body = JSON.stringify({
    type: status === 400 ? 'urn:problem:bad_request' : problemType(status),
    title: titles[status] ?? 'Error',
    status,
    detail,
  } satisfies Problem);
  return (
    `HTTP/1.1 ${status} ${titles[status] ?? 'Error'}\r\nContent-Type: application/problem+json; charset=utf-8\r\n` +
    `Content-Length: ${Buffer.byteLength(body)}\r\nConnection: close\r\n${extraHeaders}\r\n${body}`
  );
}

/** A request the HTTP parser refused (bad method, target or header bytes, framing, headers too large, timeout). */
export function answerClientError(err: Error & { code?: string }, socket: Duplex): void {
  const started = (socket as Duplex & { _httpMessage?: { headersSent?: boolean } })._httpMessage?.headersSent;
  if (err.code === 'ECONNRESET' || !socket.writable || started) {
    socket.destroy();
    return;
  }
  const status = err.code === 'HPE_HEADER_OVERFLOW' ? 431 : err.code === 'ERR_HTTP_REQUEST_TIMEOUT' ? 408 : 400;
  const detail =
    status === 431
      ? 'the request headers are larger than the limit'
      : status === 408
        ? 'the request took too long to arrive'
        : 'the request is not valid HTTP/1.1';
  socket.end(rawProblem(status, detail));
}

/** CONNECT (a tunnel request): not something this service does. */
export function answerConnect(_req: IncomingMessage, socket: Duplex): void {
  socket.end(rawProblem(405, 'CONNECT is not supported', 'Allow: GET, HEAD, POST\r\n'));
}

/** An `Expect` header other than 100-continue. */
export function answerExpectation(_req: IncomingMessage, res: ServerResponse): void {
  const body = JSON.stringify({
    type: problemType(417),
    title: titles[417] ?? 'Expectation Failed',
    status: 417,
    detail: 'only Expect: 100-continue is supported',
  } satisfies Problem);
  res.writeHead(417, { 'Content-Type': 'application/problem+json; charset=utf-8', 'Content-Length': Buffer.byteLength(body), Connection: 'close' });
  res.end(body);
}
