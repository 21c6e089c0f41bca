// The fleet-wide provider limit (issue 12): three worker processes (the real service, the Replicate
// provider) against one local Replicate (test/support/local-replicate.ts) that enforces a create limit
// of its own, as Replicate does per account. Each run does the same backlog twice on fresh databases:
// with REPLICATE_CREATES_PER_MINUTE set a little below the local Replicate's limit, and without it.
// Figures: creates per minute against the configured limit, and the local Replicate's 429 answers per
// create, each counted by the local Replicate itself.
//
// This file is also the worker child (BENCH_FLEET_WORKER=1): the service from the environment.
import path from 'node:path';
import { mkdtempSync } from 'node:fs';
import { parseConfig } from '../src/config.ts';
import { createLogger } from '../src/logger.ts';
import { startService } from '../src/service.ts';
import { startLocalReplicate, type LocalReplicate } from '../test/support/local-replicate.ts';
import { forkChild, stopChild, waitForMessage } from './common.ts';
import { enqueueOurs, openBenchDb, ourProgress } from './db.ts';
import { drain, image64, type Context, type Measure } from './scenarios.ts';

/** What the local Replicate allows (a Replicate account: creates a minute, and a burst). */
const ACCOUNT = { perMinute: 600, burst: 10 };
/** The setting under test: 95% of the account's limit, no burst. */
const CONFIGURED = 570;
const WORKERS = 3;
const SLOTS = 20;

if (process.env.BENCH_FLEET_WORKER === '1') await runWorkerChild();

async function runWorkerChild(): Promise<void> {
  const config = parseConfig(process.env);
  const service = await startService({
    config,
    databaseUrl: process.env.BENCH_DATABASE_URL!,
    logger: createLogger(config.LOG_LEVEL, { role: 'worker' }),
    api: false,
    worker: true,
  });
  const stop = () => void service.stop().finally(() => process.exit(0));
  process.on('message', (m: { cmd?: string }) => m.cmd === 'stop' && stop());
  process.on('disconnect', () => process.exit(1)); // the bench died: never outlive it
  process.on('SIGTERM', stop);
  process.send?.({ type: 'ready', pid: process.pid });
}

interface Phase {
  /** Accepted creates per minute, from the first accepted create to the last. */
  perMinute: number;
  created: number;
  throttled: number;
  seconds: number;
}

async function runPhase(ctx: Context, replicate: LocalReplicate, label: string, jobs: number, env: Record<string, string>): Promise<Phase> {
  const db = await ctx.newDatabase(ctx.main, `fleet_${label}`);
  const bench = await openBenchDb(db.url);
  // A fresh limit object: the local Replicate's bucket starts full, as an idle account's would.
  replicate.createLimit = { ...ACCOUNT };
  const from = replicate.requests.length;
  const workers = await Promise.all(
    Array.from({ length: WORKERS }, async (_, i) => {
      const child = forkChild('./fleet-limit.ts', {
        logFile: path.join(ctx.tmp, `fleet-${label}-${i}.log`),
        env: {
          BENCH_FLEET_WORKER: '1',
          BENCH_DATABASE_URL: db.url,
          NODE_ENV: 'production',
          LOG_LEVEL: ctx.logLevel,
          RUN_MIGRATIONS: 'false',
          MEDIA_DIR: mkdtempSync(path.join(ctx.tmp, 'media-fleet-')),
          DATABASE_POOL_MAX: '5',
          WORKER_CONCURRENCY: String(SLOTS),
          WORKER_POLL_INTERVAL_SECONDS: '0.5',
          PROVIDER: 'replicate',
          REPLICATE_API_TOKEN: replicate.token,
          REPLICATE_BASE_URL: replicate.baseUrl,
          REPLICATE_DOWNLOAD_HOSTS: replicate.origin,
          REPLICATE_POLL_INTERVAL_MS: '50',
          ...ctx.serviceEnv,
          ...env,
        },
      });
      await waitForMessage(child, 'ready', 60_000);
      return child;
    }),
  );
  try {
    const t0 = Date.now();
    await enqueueOurs(bench, jobs, image64, 500, (n) => `fleet ${label} ${n}`);
    const drained = await drain(() => ourProgress(bench), `fleet-limit ${label}`, 10 * 60_000);
    if (!drained) throw new Error(`fleet-limit ${label}: the backlog did not drain within 10 minutes`);
    const progress = await ourProgress(bench);
    if (progress.failed > 0) throw new Error(`fleet-limit ${label}: ${progress.failed} jobs failed`);
    const creates = replicate.requests.slice(from).filter((r) => r.route === 'create-model' || r.route === 'create-version');
    const accepted = creates.filter((r) => r.status === 201).map((r) => r.at);
    const span = accepted.length > 1 ? accepted[accepted.length - 1] - accepted[0] : NaN;
    return {
      perMinute: ((accepted.length - 1) / span) * 60_000,
      created: accepted.length,
      throttled: creates.filter((r) => r.status === 429).length,
      seconds: (Date.now() - t0) / 1000,
    };
  } finally {
    await Promise.all(workers.map((w) => stopChild(w)));
    await bench.close();
    await db.drop();
  }
}

export async function fleetLimitScenario(ctx: Context): Promise<Measure[]> {
  const jobs = ctx.quick ? 100 : 300;
  const replicate = await startLocalReplicate();
  // A short model run, so the fleet's slots (3 × 20) could create far faster than the account allows.
  replicate.setScenario({ runMs: 200 });
  const limited: Phase[] = [];
  const unlimited: Phase[] = [];
  try {
    for (let run = 0; run < ctx.runs; run++) {
      const order = run % 2 === 0 ? (['limited', 'unlimited'] as const) : (['unlimited', 'limited'] as const);
      for (const which of order) {
        const env: Record<string, string> = which === 'limited' ? { REPLICATE_CREATES_PER_MINUTE: String(CONFIGURED), REPLICATE_CREATE_BURST: '1' } : {};
        const phase = await runPhase(ctx, replicate, which, jobs, env);
        (which === 'limited' ? limited : unlimited).push(phase);
        ctx.log(
          `  run ${run + 1}, ${which === 'limited' ? `REPLICATE_CREATES_PER_MINUTE=${CONFIGURED}` : 'no shared limit'}: ${jobs} jobs in ${phase.seconds.toFixed(1)} s, ` +
            `${phase.perMinute.toFixed(1)} creates/min accepted, ${phase.throttled} answered 429 (${phase.created} created)`,
        );
      }
    }
  } finally {
    await replicate.close();
  }
  const pct = (p: Phase) => (100 * p.throttled) / Math.max(1, p.created + p.throttled);
  const setup = `${WORKERS} workers × ${SLOTS} slots, ${jobs} jobs; local Replicate allows ${ACCOUNT.perMinute}/min (burst ${ACCOUNT.burst})`;
  return [
    {
      scenario: 'fleet-limit',
      metric: `creates/min with REPLICATE_CREATES_PER_MINUTE=${CONFIGURED}`,
      unit: '/min',
      ours: limited.map((p) => p.perMinute),
      baseline: limited.map(() => CONFIGURED),
      baselineLabel: 'the configured limit',
      better: 'higher',
      target: { text: 'within 5% of the configured limit', check: (_ours, ratio) => ratio !== undefined && Math.abs(ratio - 1) <= 0.05 },
      note: setup,
    },
    {
      scenario: 'fleet-limit',
      metric: '429s per create, shared limit',
      unit: '%',
      ours: limited.map(pct),
      better: 'lower',
      target: { text: '≤ 1% of creates', check: (ours) => ours <= 1 },
      note: `429 answers: ${limited.map((p) => p.throttled).join(', ')} (runs); creates: ${limited.map((p) => p.created).join(', ')}`,
    },
    {
      scenario: 'fleet-limit',
      metric: '429s per create, no shared limit',
      unit: '%',
      ours: unlimited.map(pct),
      better: 'lower',
      note: `429 answers: ${unlimited.map((p) => p.throttled).join(', ')} (runs); creates/min accepted: ${unlimited.map((p) => p.perMinute.toFixed(0)).join(', ')}`,
    },
  ];
}
