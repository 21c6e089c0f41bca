// Issue 10, measured: what keys and per-key limits cost on submit (keys on against keys off, same
// run), and /status latency while 2,000 event streams watch one queued job (against no streams).
// Also the child that holds the streams (BENCH_STREAMS=1), so the bench process measures undisturbed.
import http from 'node:http';
import { insertApiKey } from '../src/auth/api-key.repository.ts';
import { generateApiKey } from '../src/auth/principal.ts';
import { createDatabase, createPool } from '../src/db/database.ts';
import { call, forkChild, nowMs, percentile, sleep, stopChild } from './common.ts';
import { alternate, runLoad, startServiceChild, type Context, type Measure } from './scenarios.ts';
import path from 'node:path';

const body = { prompt: 'a lighthouse on a cliff at dawn, benchmark', parameters: { width: 64, height: 64 } };

async function createKeys(databaseUrl: string, count: number): Promise<string[]> {
  const db = createDatabase(createPool({ connectionString: databaseUrl, max: 1, applicationName: 'bench:keys' }));
  try {
    const keys: string[] = [];
    for (let i = 0; i < count; i++) {
      const material = generateApiKey();
      await insertApiKey(db, { name: `bench ${i}`, prefix: material.prefix, hash: material.hash, operator: false });
      keys.push(material.key);
    }
    return keys;
  } finally {
    await db.destroy();
  }
}

export async function securityScenario(ctx: Context): Promise<Measure[]> {
  return [...(await submitWithKeys(ctx)), ...(await statusUnderStreams(ctx))];
}

/**
 * Submit throughput as the submit scenario measures it (32 connections, durable Postgres), with keys
 * on (authentication, the Postgres-shared rate limit and the queued-jobs cap checked on every request,
 * limits set high enough never to refuse) against keys off (anonymous local principal: no limits).
 * Keys on runs twice: 8 clients of 4 connections each (a service has many clients), and one key alone
 * (its worst case: a key's submissions commit one after another under its queued-jobs lock).
 */
async function submitWithKeys(ctx: Context): Promise<Measure[]> {
  const connections = 32;
  const CLIENTS = 8;
  const seconds = ctx.quick ? 2 : 6;
  const warmup = ctx.quick ? 1 : 2;
  const variants = { many: [] as number[], one: [] as number[], off: [] as number[] };
  const env = { ANONYMOUS_ACCESS: 'off', KEY_RATE_LIMIT_PER_SECOND: '1000000', KEY_RATE_LIMIT_BURST: '1000000', KEY_MAX_QUEUED_JOBS: '1000000' };
  for (let run = 0; run < ctx.runs; run++) {
    const measure = async (variant: keyof typeof variants) => {
      const db = await ctx.newDatabase(ctx.durable, `security_submit_${variant}${run}`);
      try {
        const api = await startServiceChild(ctx, 'api', db.url, variant === 'off' ? {} : env);
        try {
          const keys = variant === 'off' ? [] : await createKeys(db.url, variant === 'many' ? CLIENTS : 1);
          const headerSets = keys.map((key) => ({ authorization: `Bearer ${key}` }));
          const target = `http://127.0.0.1:${api.port}`;
          const { result } = await runLoad(ctx, { kind: 'http', target, connections, durationSeconds: seconds, warmupSeconds: warmup, body, headerSets });
          if (result.errors > 0) ctx.log(`  ${variant}: ${result.errors} non-202 responses`);
          variants[variant].push(result.perSecond);
          ctx.log(
            `  run ${run + 1}: keys ${variant === 'off' ? 'off' : variant === 'many' ? `on, ${CLIENTS} keys` : 'on, 1 key'}: ${result.perSecond.toFixed(0)} req/s p50 ${result.p50.toFixed(1)} p99 ${result.p99.toFixed(1)} ms`,
          );
        } finally {
          await stopChild(api.child);
        }
      } finally {
        await db.drop();
      }
    };
    await alternate(
      run,
      () => measure('many'),
      () => measure('off'),
    );
    await measure('one');
  }
  const off = { baseline: variants.off, baselineLabel: 'keys off (anonymous local)', better: 'higher' as const, unit: 'req/s', scenario: 'security' };
  return [
    {
      ...off,
      metric: `submit with keys on, ${CLIENTS} keys × ${connections / CLIENTS} connections`,
      ours: variants.many,
      target: { text: '≥ 90% of keys off', check: (_o: number, r: number | undefined) => r !== undefined && r >= 0.9 },
    },
    {
      ...off,
      metric: `submit with keys on, 1 key × ${connections} connections`,
      ours: variants.one,
      note: "one key's submissions commit one at a time (its queued-jobs cap is exact across replicas), so they cannot share a WAL flush; its rate limit (default 20/s) binds long before",
    },
  ];
}

/**
 * /status p95 of the watched job while STREAMS event streams follow it and other jobs keep arriving
 * (each arrival may move queue positions: with one computation per change for all watchers, the
 * streams add almost nothing). Baseline: the same traffic with no streams open.
 */
async function statusUnderStreams(ctx: Context): Promise<Measure[]> {
  const STREAMS = ctx.quick ? 500 : 2000;
  const SAMPLES = ctx.quick ? 100 : 300;
  const withStreams: number[] = [];
  const without: number[] = [];
  for (let run = 0; run < ctx.runs; run++) {
    const db = await ctx.newDatabase(ctx.main, `security_streams${run}`);
    // API only: no worker, so the watched job stays queued; anonymous local, so no stream cap applies.
    const api = await startServiceChild(ctx, 'api', db.url, {});
    try {
      const target = `http://127.0.0.1:${api.port}`;
      const post = async () =>
        (
          (await (
            await fetch(`${target}/generate`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(body) })
          ).json()) as { job_id: string }
        ).job_id;
      const watched = await post();
      // Background arrivals, ~20 a second, for the whole measurement.
      let arriving = true;
      const arrivals = (async () => {
        // eslint-disable-next-line @typescript-eslint/no-unnecessary-condition -- cleared by the measurement below
        while (arriving) {
          await post();
          await sleep(50);
        }
      })();
      const p95 = async () => {
        const latencies: number[] = [];
        for (let i = 0; i < SAMPLES; i++) {
          const t0 = nowMs();
          const res = await fetch(`${target}/status/${watched}`);
          await res.arrayBuffer();
          latencies.push(nowMs() - t0);
          await sleep(10);
        }
        return percentile(latencies, 95);
      };
      const measureWith = async () => {
        const holder = forkChild('./security.ts', { logFile: path.join(ctx.tmp, 'streams.log'), env: { BENCH_STREAMS: '1' } });
        try {
          await call(holder, 'open', { url: `${target}/jobs/${watched}/events`, count: STREAMS }, 120_000);
          withStreams.push(await p95());
          const { events } = await call<{ events: number }>(holder, 'count');
          ctx.log(`  run ${run + 1}: ${STREAMS} streams open (${events} events received): /status p95 ${withStreams.at(-1)!.toFixed(1)} ms`);
        } finally {
          await stopChild(holder, 5_000);
        }
      };
      const measureWithout = async () => {
        without.push(await p95());
        ctx.log(`  run ${run + 1}: no streams: /status p95 ${without.at(-1)!.toFixed(1)} ms`);
      };
      await alternate(run, measureWith, measureWithout);
      arriving = false;
      await arrivals;
    } finally {
      await stopChild(api.child);
      await db.drop();
    }
  }
  return [
    {
      scenario: 'security',
      metric: `/status p95 with ${STREAMS} streams on one queued job`,
      unit: 'ms',
      ours: withStreams,
      baseline: without,
      baselineLabel: 'no streams',
      better: 'lower',
      ratioAsTimes: true,
      target: { text: 'p95 < 100 ms', check: (o) => o < 100 },
    },
  ];
}

// ---------------------------------------------------------------------------------------------
// Child: holds event streams open (BENCH_STREAMS=1), over IPC: open {url, count} → reply; count → reply.
if (process.env.BENCH_STREAMS === '1') {
  const agent = new http.Agent({ keepAlive: false, maxSockets: Infinity });
  const requests: http.ClientRequest[] = [];
  let events = 0;
  const open = (url: string) =>
    new Promise<void>((resolve, reject) => {
      const req = http.get(url, { agent, headers: { accept: 'text/event-stream' } }, (res) => {
        if (res.statusCode !== 200) return reject(new Error(`stream answered ${res.statusCode}`));
        res.on('data', (chunk: Buffer) => {
          events += chunk.toString('utf8').split('\n\n').length - 1;
        });
        resolve();
      });
      req.on('error', reject);
      requests.push(req);
    });
  process.on('message', (m: { cmd: string; id: number; url?: string; count?: number }) => {
    void (async () => {
      try {
        if (m.cmd === 'open') {
          for (let i = 0; i < m.count!; i += 100) await Promise.all(Array.from({ length: Math.min(100, m.count! - i) }, () => open(m.url!)));
          process.send?.({ type: 'reply', id: m.id });
        } else if (m.cmd === 'count') {
          process.send?.({ type: 'reply', id: m.id, events });
        } else if (m.cmd === 'stop') {
          for (const req of requests) req.destroy();
          process.exit(0);
        }
      } catch (err) {
        process.send?.({ type: 'reply', id: m.id, error: (err as Error).message });
      }
    })();
  });
  process.on('disconnect', () => process.exit(0));
}
