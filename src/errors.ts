// The one error vocabulary: typed codes that the HTTP layer maps to problem+json.

export type ErrorCode =
  | 'validation_failed'
  | 'not_found'
  | 'idempotency_conflict'
  | 'job_finished'
  | 'unavailable'
  | 'payload_too_large'
  | 'unsupported_media_type'
  | 'unsafe_url'
  | 'unauthorized'
  | 'forbidden'
  | 'rate_limited';

const statusOf: Record<ErrorCode, number> = {
  validation_failed: 400,
  not_found: 404,
  idempotency_conflict: 422,
  job_finished: 409,
  unavailable: 503,
  payload_too_large: 413,
  unsupported_media_type: 415,
  unsafe_url: 422,
  unauthorized: 401,
  forbidden: 403,
  rate_limited: 429,
};

export interface FieldError {
  path: string;
  message: string;
}

export class AppError extends Error {
  readonly code: ErrorCode;
  readonly status: number;
  readonly errors?: FieldError[];
  /** Extension members of the problem document (e.g. the unchanged `job` of a 409). */
  readonly extensions?: Record<string, unknown>;
  /** Sent as `Retry-After` (a 429 says when to come back). */
  retryAfterSeconds?: number;

  constructor(code: ErrorCode, message: string, errors?: FieldError[], extensions?: Record<string, unknown>) {
    super(message);
    this.name = 'AppError';
    this.code = code;
    this.status = statusOf[code];
    this.errors = errors;
    this.extensions = extensions;
  }
}

/** Errors that mean "the database is not reachable right now" rather than a bug. */
export function isDatabaseUnavailable(err: unknown): boolean {
  const e = err as { code?: string; message?: string } | undefined;
  if (!e) return false;
  const codes = [
    'ECONNREFUSED',
    'ECONNRESET',
    'ETIMEDOUT',
    'ENOTFOUND',
    'EPIPE',
    '57P01',
    '57P02',
    '57P03',
    '53300',
    '08000',
    '08003',
    '08006',
    '08001',
    '08004',
  ];
  if (e.code && codes.includes(e.code)) return true;
  return /Connection terminated|connection timeout|timeout exceeded when trying to connect|Client has encountered a connection error|the database system is (starting up|shutting down)|Connection refused/i.test(
    e.message ?? '',
  );
}

/**
 * Database errors a retry can cure: the database unreachable, or a transaction Postgres aborted to
 * resolve a conflict (serialization failure, deadlock, lock or statement timeout).
 */
export function isTransientDatabaseError(err: unknown): boolean {
  const code = (err as { code?: string } | undefined)?.code;
  return isDatabaseUnavailable(err) || code === '40001' || code === '40P01' || code === '55P03' || code === '57014';
}

/**
 * Postgres refusing text it cannot store (NUL, invalid UTF-8): the request's data is at fault, not the
 * service, so the HTTP layer answers 400 instead of 500.
 */
export function isUnstorableText(err: unknown): boolean {
  const code = (err as { code?: string } | undefined)?.code;
  return code === '22021' /* character_not_in_repertoire */ || code === '22P05'; /* untranslatable_character */
}
