// The pino root logger; secrets are redacted wherever they appear in a logged object.
import { pino, type DestinationStream, type Logger } from 'pino';

export type { Logger };

const secretKeys = ['authorization', 'Authorization', 'token', 'apiToken', 'REPLICATE_API_TOKEN', 'WEBHOOK_SECRET', 'password', 'connectionString', 'DATABASE_URL'];

/** Secret keys at the top of a logged object and one level down, and request headers. */
export const redactPaths = [
  ...secretKeys,
  ...secretKeys.map((k) => `*.${k}`),
  'req.headers.authorization',
  'req.headers.cookie',
];

export function createLogger(level: string, base: Record<string, unknown> = {}, destination?: DestinationStream): Logger {
  return pino({ level, base, redact: { paths: redactPaths, censor: '[redacted]' } }, destination);
}

/** A URL fit for logs: the password replaced. */
export function redactUrl(url: string): string {
  try {
    const u = new URL(url);
    if (u.password) u.password = 'redacted';
    return u.toString();
  } catch {
    return '[unparseable url]';
  }
}
