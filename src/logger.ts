// The pino root logger; secrets are redacted wherever they appear in a logged object.
import { pino, type DestinationStream, type Logger } from 'pino';

export type { Logger };

const secretKeys = [
  'authorization', // our own bearer keys
  'Authorization',
  'proxy-authorization',
  'x-api-key',
  'cookie',
  'token',
  'apiToken',
  'REPLICATE_API_TOKEN',
  'WEBHOOK_SECRET',
  'S3_SECRET_ACCESS_KEY',
  'secretAccessKey',
  'password',
  'connectionString',
  'DATABASE_URL',
];
// Shown without their query string (a webhook_url's may hold the receiver's token) or password.
const urlKeys = ['url', 'webhook_url', 'webhookUrl'];

/** Bracketed, so that keys with dashes are paths too. */
const at = (prefix: string, key: string) => `${prefix}[${JSON.stringify(key)}]`;

/** Secret keys at the top of a logged object, one level down, and in any object's `headers`. */
export const redactPaths = [
  ...secretKeys.map((k) => at('', k)),
  ...secretKeys.map((k) => at('*', k)),
  ...secretKeys.map((k) => at('*.headers', k)),
  ...urlKeys,
  ...urlKeys.map((k) => `*.${k}`),
  ...urlKeys.map((k) => `*.*.${k}`),
];

function censor(value: unknown, path: string[]): unknown {
  if (!urlKeys.includes(path[path.length - 1])) return '[redacted]';
  return typeof value === 'string' ? redactUrl(value) : value;
}

export function createLogger(level: string, base: Record<string, unknown> = {}, destination?: DestinationStream): Logger {
  return pino({ level, base, redact: { paths: redactPaths, censor } }, destination);
}

/** A URL fit for logs: the password replaced, the query string and fragment dropped (relative ones too). */
export function redactUrl(url: string): string {
  try {
    const relative = url.startsWith('/');
    const u = new URL(url, 'http://relative.invalid');
    if (u.password) u.password = 'redacted';
    if (u.search) u.search = '?redacted';
    u.hash = '';
    return relative ? `${u.pathname}${u.search}` : u.toString();
  } catch {
    return '[unparseable url]';
  }
}
