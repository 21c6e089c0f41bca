// The pino root logger; secrets are redacted wherever they appear in a logged object.
import { pino, type Logger } from 'pino';

export type { Logger };

export const redactPaths = [
  'req.headers.authorization',
  'req.headers.cookie',
  '*.authorization',
  '*.Authorization',
  '*.token',
  '*.apiToken',
  '*.REPLICATE_API_TOKEN',
  '*.password',
  '*.connectionString',
  '*.DATABASE_URL',
];

export function createLogger(level: string, base: Record<string, unknown> = {}): Logger {
  return pino({ level, base, redact: { paths: redactPaths, censor: '[redacted]' } });
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
