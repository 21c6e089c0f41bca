// Which web pages of other origins may call the API from a browser (CORS). The page at `/` is served by
// the API itself and needs none of this. Callers authenticate with a header, never a cookie, so no
// credentials are allowed. Default: pages on this machine (localhost, 127.0.0.1, [::1], any port), which
// is what a front-end dev server needs; CORS_ORIGINS=* opens it to every origin, a list to those origins.
import cors from 'cors';
import type { RequestHandler } from 'express';

const LOOPBACK_ORIGIN = /^https?:\/\/(localhost|127(\.\d{1,3}){3}|\[::1\])(:\d{1,5})?$/;

export function corsPolicy(origins: readonly string[] | undefined): RequestHandler {
  const allowed = (origin: string) => (origins === undefined ? LOOPBACK_ORIGIN.test(origin) : origins.includes('*') || origins.includes(origin));
  return cors({
    origin: (origin, callback) => callback(null, origin !== undefined && allowed(origin) ? (origins?.includes('*') ? '*' : origin) : false),
    methods: ['GET', 'HEAD', 'POST'],
    allowedHeaders: ['Authorization', 'Content-Type', 'Idempotency-Key', 'Last-Event-ID', 'X-Request-Id'],
    exposedHeaders: ['Location', 'Retry-After', 'X-Request-Id', 'RateLimit', 'RateLimit-Policy'],
    maxAge: 600,
  });
}
