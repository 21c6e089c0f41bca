// Parses and validates the environment (and `.env`) once into a frozen, typed Config.
import { existsSync } from 'node:fs';
import { z } from 'zod';
import { parseCidr } from './net/outbound.ts';

const int = (min: number, max: number) => z.coerce.number().int().min(min).max(max);
const seconds = (min: number, max: number) => z.coerce.number().min(min).max(max);
const bool = z.enum(['true', 'false', '1', '0']).transform((v) => v === 'true' || v === '1');
const list = z.string().transform((v) =>
  v
    .split(',')
    .map((s) => s.trim())
    .filter(Boolean),
);

const schema = z
  .object({
    NODE_ENV: z.enum(['development', 'production', 'test']).default('development'),
    PORT: int(0, 65535).default(8000),
    // Loopback by default: a networked bind (0.0.0.0, the image's setting) requires API keys.
    HOST: z.string().default('127.0.0.1'),
    LOG_LEVEL: z.enum(['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent']).default('info'),
    DATABASE_URL: z.url({ protocol: /^postgres(ql)?$/ }).optional(),
    DATABASE_POOL_MAX: int(1, 200).default(10),
    // A direct session (not through PgBouncer in transaction mode) for LISTEN and migrations; unset = DATABASE_URL.
    DATABASE_DIRECT_URL: z.url({ protocol: /^postgres(ql)?$/ }).optional(),
    DATA_DIR: z.string().min(1).default('.data'),
    EMBEDDED_PG_PORT: int(1, 65535).default(54329),
    MEDIA_DIR: z.string().min(1).default('media'),
    // Where outputs are kept: `local` (MEDIA_DIR) or `s3` (an S3-compatible bucket, README "Running on several hosts").
    MEDIA_STORAGE: z.enum(['local', 's3']).default('local'),
    S3_BUCKET: z
      .string()
      .regex(/^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$/, 'a bucket name (3-63 lowercase letters, digits, dots, hyphens)')
      .optional(),
    S3_PREFIX: z
      .string()
      .regex(/^[\w./-]*$/, 'letters, digits, _ . - and /')
      .optional(),
    S3_ENDPOINT: z.url({ protocol: /^https?$/ }).optional(),
    S3_REGION: z.string().min(1).default('us-east-1'),
    S3_ACCESS_KEY_ID: z.string().min(1).optional(),
    S3_SECRET_ACCESS_KEY: z.string().min(1).optional(),
    S3_FORCE_PATH_STYLE: bool.default(false),
    MAX_BODY_BYTES: int(1024, 10 * 1024 * 1024).default(64 * 1024),
    IDEMPOTENCY_TTL_HOURS: int(1, 24 * 30).default(24),
    // Finished jobs (with their attempts, events, webhook deliveries and files) older than this are
    // deleted; unset = kept forever. pg-boss's finished queue entries are kept QUEUE_RETENTION_DAYS.
    JOB_RETENTION_DAYS: int(1, 36_500).optional(),
    QUEUE_RETENTION_DAYS: int(1, 365).default(7),

    PROVIDER: z.enum(['auto', 'local', 'replicate']).default('auto'),
    LOCAL_PROVIDER_LATENCY_MS: int(0, 600_000).default(0),
    REPLICATE_API_TOKEN: z.string().min(1).optional(),
    REPLICATE_BASE_URL: z.url().default('https://api.replicate.com/v1'),
    REPLICATE_MODEL: z
      .string()
      .regex(/^[\w.-]+\/[\w.-]+(:[0-9a-f]{64})?$/, 'owner/name or owner/name:version')
      .default('black-forest-labs/flux-schnell'),
    REPLICATE_API_STYLE: z.enum(['replicate', 'cog']).default('replicate'),
    REPLICATE_WAIT_SECONDS: int(1, 60).default(60),
    REPLICATE_DEADLINE_SECONDS: int(5, 3600).default(600),
    REPLICATE_POLL_INTERVAL_MS: int(10, 60_000).default(1000),
    REPLICATE_MAX_RATE_LIMIT_WAIT_SECONDS: int(0, 600).default(30),
    REPLICATE_DOWNLOAD_HOSTS: list.default(['replicate.delivery']),
    MAX_IMAGE_BYTES: int(1024, 1024 * 1024 * 1024).default(50 * 1024 * 1024),
    REPLICATE_DOWNLOAD_TIMEOUT_MS: int(100, 600_000).default(60_000),
    // Fleet-wide limit of prediction creates (shared through Postgres); unset = no limit.
    REPLICATE_CREATES_PER_MINUTE: z.coerce.number().positive().max(1_000_000).optional(),
    REPLICATE_CREATE_BURST: int(1, 10_000).default(1),

    JOB_RETRY_LIMIT: int(0, 100).default(5),
    JOB_RETRY_DELAY_SECONDS: int(1, 3600).default(1),
    JOB_RETRY_DELAY_MAX_SECONDS: int(1, 86_400).default(60),
    JOB_TIMEOUT_SECONDS: int(1, 86_400).default(900),
    JOB_HEARTBEAT_SECONDS: int(10, 3600).default(30),
    WORKER_CONCURRENCY: int(1, 10_000).default(100),
    WORKER_BATCH_SIZE: int(1, 10_000).default(1000),
    IMAGE_CONCURRENCY: int(0, 1000).default(0),
    WORKER_POLL_INTERVAL_SECONDS: seconds(0.5, 60).default(2),
    WORKER_SUPERVISE_INTERVAL_SECONDS: int(1, 3600).default(10),
    SHUTDOWN_GRACE_SECONDS: int(0, 3600).default(30),
    MAX_IMAGE_PIXELS: int(1, 1_000_000_000).default(64 * 1024 * 1024),
    RUN_MIGRATIONS: bool.default(true),
    WEBHOOK_SECRET: z
      .string()
      .regex(/^whsec_[A-Za-z0-9+/]+={0,2}$/, 'whsec_ followed by base64')
      .optional(),
    WEBHOOK_RETRY_LIMIT: int(0, 50).default(8),
    WEBHOOK_TIMEOUT_MS: int(100, 120_000).default(10_000),
    WEBHOOK_ALLOWED_CIDRS: list
      .pipe(
        z.array(
          z.string().transform((v, ctx) => {
            try {
              return parseCidr(v);
            } catch (err) {
              ctx.addIssue({ code: 'custom', message: (err as Error).message });
              return z.NEVER;
            }
          }),
        ),
      )
      .optional(),
    WEBHOOK_HOST_CONCURRENCY: int(1, 1000).default(4),
    WEBHOOK_CONCURRENCY: int(1, 1000).default(50),
    METRICS_PORT: int(0, 65535).optional(),
    // Origins whose web pages may call the API (CORS): unset = pages on this machine, `*` = any, or a list.
    CORS_ORIGINS: list.optional(),

    // Who may do what (see README "Security").
    ANONYMOUS_ACCESS: z.enum(['loopback', 'off']).default('loopback'),
    KEY_RATE_LIMIT_PER_SECOND: int(0, 1_000_000).default(20),
    KEY_RATE_LIMIT_BURST: int(0, 1_000_000).default(100),
    KEY_MAX_QUEUED_JOBS: int(0, 10_000_000).default(1000),
    KEY_MAX_EVENT_STREAMS: int(0, 1_000_000).default(100),
    KEY_MAX_PRIORITY: int(0, 100).default(10),
  })
  .superRefine(checkS3Settings);

/** MEDIA_STORAGE=s3 needs a bucket; static S3 credentials come as a pair (or not at all: the SDK's chain). */
function checkS3Settings(
  env: { MEDIA_STORAGE: string; S3_BUCKET?: string; S3_ACCESS_KEY_ID?: string; S3_SECRET_ACCESS_KEY?: string },
  ctx: z.RefinementCtx,
): void {
  if (env.MEDIA_STORAGE === 's3' && !env.S3_BUCKET) ctx.addIssue({ code: 'custom', path: ['S3_BUCKET'], message: 'required when MEDIA_STORAGE=s3' });
  if (!env.S3_ACCESS_KEY_ID !== !env.S3_SECRET_ACCESS_KEY) {
    ctx.addIssue({
      code: 'custom',
      path: [env.S3_ACCESS_KEY_ID ? 'S3_SECRET_ACCESS_KEY' : 'S3_ACCESS_KEY_ID'],
      message: 'S3_ACCESS_KEY_ID and S3_SECRET_ACCESS_KEY go together',
    });
  }
}

/** Every variable the configuration knows (tests check `.env.example` documents exactly these). */
export const configKeys: readonly string[] = Object.freeze(Object.keys(schema.shape));

export type Env = z.input<typeof schema>;
export type Config = Readonly<z.output<typeof schema>>;

export class ConfigError extends Error {}

/** Validates `env`; throws a ConfigError naming every bad variable. */
export function parseConfig(env: Record<string, string | undefined>): Config {
  // An empty variable means "unset", as in most .env tooling.
  const cleaned = Object.fromEntries(Object.entries(env).filter(([, v]) => v !== undefined && v !== ''));
  const result = schema.safeParse(cleaned);
  if (!result.success) {
    const lines = result.error.issues.map((i) => `  ${i.path.join('.')}: ${i.message}`);
    throw new ConfigError(`invalid configuration:\n${lines.join('\n')}`);
  }
  return Object.freeze(result.data);
}

/** The process environment, with `.env` (if present) filling in what is not already set. */
export function loadConfig(envFile = '.env'): Config {
  if (existsSync(envFile)) process.loadEnvFile(envFile);
  return parseConfig(process.env);
}
