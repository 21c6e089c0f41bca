// Several hosts, simulated (issue 12): Postgres, the API, up to three workers and a client each in a
// Linux network namespace of their own, joined by veth pairs to a bridge in a hub namespace, on a
// private range that exists only inside those namespaces (nothing is routed to or from this host's own
// network). Jobs bound by provider latency (LOCAL_PROVIDER_LATENCY_MS, few slots per worker) measure
// throughput with 1, 2 and 3 worker hosts; then, with three, one worker's namespace is killed mid-run
// (every process in it SIGKILLed, then the namespace deleted) and the database must show every job
// completed exactly once. Needs root and iproute2's `ip`; refuses otherwise. Namespaces are removed on
// exit, also after a failure or Ctrl-C.
import { execFileSync, spawn, type ChildProcess } from 'node:child_process';
import { chmodSync, closeSync, mkdirSync, openSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { call, sleep, stopChild, waitForMessage } from './common.ts';
import type { Context, Measure } from './scenarios.ts';

const SUBNET = '10.77.12';
const RANGE = `${SUBNET}.0/24`;
const PG_PORT = 5432;
const API_PORT = 8000;

/** Why this machine cannot run the scenario, or undefined when it can. */
export function hostsRefusal(): string | undefined {
  if (process.platform !== 'linux') return 'the hosts scenario needs Linux network namespaces';
  if (process.getuid?.() !== 0) return 'the hosts scenario needs root (it creates network namespaces): sudo npm run bench -- --only=hosts';
  try {
    execFileSync('ip', ['-V'], { stdio: 'ignore' });
  } catch {
    return "the hosts scenario needs iproute2's `ip` (Debian: apt-get install -y iproute2)";
  }
  return undefined;
}

const ip = (...args: string[]) => execFileSync('ip', args, { stdio: ['ignore', 'pipe', 'pipe'] }).toString();

/** The namespaces of one scenario run: created here, torn down by `destroy` (idempotent, synchronous). */
class Network {
  readonly tag = `mgb${process.pid.toString(36)}`;
  readonly hub = `${this.tag}-hub`;
  private readonly made: string[] = [];
  private next = 2;
  readonly addresses = new Map<string, string>();

  constructor() {
    this.removeLeftovers();
    ip('netns', 'add', this.hub);
    this.made.push(this.hub);
    ip('-n', this.hub, 'link', 'add', 'br0', 'type', 'bridge');
    ip('-n', this.hub, 'link', 'set', 'br0', 'up');
  }

  /** A namespace joined to the bridge by a veth pair; returns its address. */
  addHost(name: string): string {
    const ns = this.ns(name);
    const address = `${SUBNET}.${this.next}`;
    const n = this.next++;
    ip('netns', 'add', ns);
    this.made.push(ns);
    ip('-n', ns, 'link', 'set', 'lo', 'up');
    // Created inside the hub, the host end moved into its namespace: nothing touches this host's own network.
    ip('-n', this.hub, 'link', 'add', `h${n}`, 'type', 'veth', 'peer', 'name', `p${n}`);
    ip('-n', this.hub, 'link', 'set', `p${n}`, 'netns', ns, 'name', 'eth0');
    ip('-n', this.hub, 'link', 'set', `h${n}`, 'master', 'br0', 'up');
    ip('-n', ns, 'addr', 'add', `${address}/24`, 'dev', 'eth0');
    ip('-n', ns, 'link', 'set', 'eth0', 'up');
    this.addresses.set(name, address);
    return address;
  }

  ns(name: string): string {
    return `${this.tag}-${name}`;
  }

  /** SIGKILLs every process in the namespace, then deletes it (its veth goes with it). */
  kill(name: string): number {
    const ns = this.ns(name);
    const pids = this.pids(ns);
    for (const pid of pids) {
      try {
        process.kill(pid, 'SIGKILL');
      } catch {
        // already gone
      }
    }
    this.delete(ns);
    return pids.length;
  }

  destroy(): void {
    for (const ns of [...this.made].reverse()) this.kill(ns.slice(this.tag.length + 1));
  }

  private pids(ns: string): number[] {
    try {
      return ip('netns', 'pids', ns).split('\n').filter(Boolean).map(Number);
    } catch {
      return [];
    }
  }

  private delete(ns: string): void {
    try {
      ip('netns', 'del', ns);
    } catch {
      // already gone
    }
    const i = this.made.indexOf(ns);
    if (i >= 0) this.made.splice(i, 1);
  }

  /** Namespaces an earlier run left behind (its process killed with SIGKILL): remove them. */
  private removeLeftovers(): void {
    for (const line of ip('netns', 'list').split('\n')) {
      const m = /^(mgb([0-9a-z]+)-\S+)/.exec(line);
      if (!m) continue;
      const pid = parseInt(m[2], 36);
      if (pid !== process.pid && !alive(pid)) {
        for (const p of this.pids(m[1])) {
          try {
            process.kill(p, 'SIGKILL');
          } catch {
            // already gone
          }
        }
        this.delete(m[1]);
      }
    }
  }
}

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}

/** Starts bench/<script> inside namespace `ns` (ip netns exec), with an IPC channel to this process. */
function spawnIn(ns: string, script: string, env: Record<string, string>, logFile: string): ChildProcess {
  const fd = openSync(logFile, 'a');
  const child = spawn('ip', ['netns', 'exec', ns, process.execPath, '--max-semi-space-size=2', fileURLToPath(new URL(script, import.meta.url))], {
    env: { PATH: process.env.PATH ?? '', HOME: process.env.HOME ?? '/tmp', ...env },
    stdio: ['ignore', fd, fd, 'ipc'],
    serialization: 'advanced',
  });
  closeSync(fd);
  return child;
}

export interface HostsOptions {
  /** Asked for by name (--only): refuse loudly; otherwise (the default set) a machine that cannot run it skips it. */
  required: boolean;
}

export async function hostsScenario(ctx: Context, options: HostsOptions): Promise<Measure[]> {
  const refusal = hostsRefusal();
  if (refusal) {
    if (options.required) throw new Error(refusal);
    ctx.log(`  skipped: ${refusal}`);
    return [];
  }
  // Per worker: `slots` jobs of `latencyMs` each at once, so its ceiling is slots / latency; CPU per job
  // (a 64×64 image) stays far below that, so the provider's latency bounds each worker.
  const latencyMs = ctx.quick ? 500 : 1000;
  const slots = ctx.quick ? 5 : 10;
  const perWorkerPerSecond = (slots * 1000) / latencyMs;
  const phaseSeconds = ctx.quick ? 6 : 20;
  const heartbeatSeconds = 10;

  const dir = path.join(ctx.tmp, 'hosts');
  mkdirSync(dir, { recursive: true });
  chmodSync(dir, 0o755);
  const net = new Network();
  const cleanup = () => net.destroy();
  process.once('exit', cleanup);
  const children: ChildProcess[] = [];
  const throughput = new Map<number, number[]>();
  const measures: Measure[] = [];
  try {
    const pgAddress = net.addHost('pg');
    const apiAddress = net.addHost('api');
    net.addHost('client');
    for (const w of [1, 2, 3]) net.addHost(`w${w}`);
    ctx.log(`  namespaces ${[...net.addresses].map(([n, a]) => `${net.ns(n)} ${a}`).join(', ')} on a bridge in ${net.hub}`);

    const pgDir = path.join(dir, 'pg');
    mkdirSync(pgDir, { recursive: true });
    chmodSync(pgDir, 0o755);
    const postgres = spawnIn(
      net.ns('pg'),
      './hosts-node.ts',
      { HOSTS_ROLE: 'postgres', HOSTS_PG_DIR: pgDir, HOSTS_PG_PORT: String(PG_PORT), HOSTS_RANGE: RANGE },
      path.join(dir, 'postgres.log'),
    );
    children.push(postgres);
    await waitForMessage(postgres, 'ready', 120_000);
    const driver = spawnIn(
      net.ns('client'),
      './hosts-node.ts',
      { HOSTS_ROLE: 'driver', HOSTS_ADMIN_URL: `postgres://postgres:postgres@${pgAddress}:${PG_PORT}/postgres` },
      path.join(dir, 'driver.log'),
    );
    children.push(driver);
    await waitForMessage(driver, 'ready', 60_000);

    const serviceEnv = (role: 'api' | 'worker', url: string, mediaDir: string): Record<string, string> => ({
      NODE_ENV: 'production',
      LOG_LEVEL: ctx.logLevel,
      BENCH_ROLE: role,
      BENCH_DATABASE_URL: url,
      MEDIA_DIR: mediaDir, // one folder on this machine's disk, as a shared volume would be
      PROVIDER: 'local',
      LOCAL_PROVIDER_LATENCY_MS: String(latencyMs),
      WORKER_CONCURRENCY: String(slots),
      JOB_HEARTBEAT_SECONDS: String(heartbeatSeconds),
      WORKER_SUPERVISE_INTERVAL_SECONDS: '2',
      RUN_MIGRATIONS: role === 'api' ? 'true' : 'false',
      ...(role === 'api'
        ? { HOST: apiAddress, PORT: String(API_PORT), KEY_RATE_LIMIT_PER_SECOND: '0', KEY_MAX_QUEUED_JOBS: '0' }
        : { HOST: '127.0.0.1', PORT: '0' }),
      ...ctx.serviceEnv,
    });

    /** One phase: a fresh database, the API, `workers` worker hosts; `jobs` submitted; optionally a host killed. */
    const phase = async (label: string, workers: number, jobs: number, killAfter?: number) => {
      const { url } = await call<{ url: string }>(driver, 'createDatabase', { name: `hosts_${label.replace(/\W/g, '_')}` });
      const mediaDir = path.join(dir, `media-${label.replace(/\W/g, '_')}`);
      mkdirSync(mediaDir, { recursive: true });
      const api = spawnIn(net.ns('api'), './serve.ts', serviceEnv('api', url, mediaDir), path.join(dir, 'api.log'));
      children.push(api);
      const running: ChildProcess[] = [api];
      try {
        await waitForMessage(api, 'ready', 60_000);
        const { key } = await call<{ key: string }>(driver, 'createKey', { url });
        // The whole backlog first, then the workers: every configuration starts from the same full queue.
        const submitted = await call<{ accepted: number; errors: string[]; seconds: number }>(
          driver,
          'submit',
          { api: `http://${apiAddress}:${API_PORT}`, key, count: jobs, concurrency: 8 },
          120_000,
        );
        if (submitted.accepted !== jobs)
          throw new Error(`${label}: only ${submitted.accepted} of ${jobs} submissions accepted: ${submitted.errors.join('; ')}`);
        await Promise.all(
          Array.from({ length: workers }, async (_, i) => {
            const worker = spawnIn(net.ns(`w${i + 1}`), './serve.ts', serviceEnv('worker', url, mediaDir), path.join(dir, `worker-${i + 1}.log`));
            children.push(worker);
            running.push(worker);
            await waitForMessage(worker, 'ready', 60_000);
          }),
        );
        let killed = false;
        const deadline = Date.now() + (phaseSeconds * 4 + heartbeatSeconds * 3 + 60) * 1000;
        for (;;) {
          const p = await call<{ pending: number; completed: number; failed: number }>(driver, 'progress', { url });
          if (killAfter !== undefined && !killed && p.completed >= killAfter) {
            const victim = `w${workers}`;
            const pids = net.kill(victim);
            killed = true;
            ctx.log(`  ${label}: killed ${net.ns(victim)} (${pids} process${pids === 1 ? '' : 'es'}) after ${p.completed} of ${jobs} jobs completed`);
          }
          if (p.pending === 0) break;
          if (Date.now() > deadline) throw new Error(`${label}: ${p.pending} jobs still pending after the deadline`);
          await sleep(250);
        }
        return { url, mediaDir };
      } finally {
        await Promise.all(running.map((c) => stopChild(c, 10_000)));
      }
    };

    for (let run = 0; run < ctx.runs; run++) {
      for (const workers of [1, 2, 3]) {
        const jobs = Math.round(perWorkerPerSecond * workers * phaseSeconds);
        const { url } = await phase(`run${run + 1}-${workers}w`, workers, jobs);
        const t = await call<{ jobs: number; seconds: number; perSecond: number }>(driver, 'throughput', { url });
        (throughput.get(workers) ?? throughput.set(workers, []).get(workers)!).push(t.perSecond);
        ctx.log(
          `  run ${run + 1}: ${workers} worker host${workers > 1 ? 's' : ''}: ${t.jobs} jobs in ${t.seconds.toFixed(1)} s, ${t.perSecond.toFixed(1)} jobs/s (ceiling ${(perWorkerPerSecond * workers).toFixed(0)})`,
        );
      }
    }

    const killJobs = Math.round(perWorkerPerSecond * 3 * phaseSeconds);
    const { url, mediaDir } = await phase('kill', 3, killJobs, Math.round(killJobs / 3));
    const check = await call<Record<string, number>>(driver, 'verify', { url, mediaDir });
    delete check.type;
    delete check.id;
    ctx.log(`  kill: ${JSON.stringify(check)}`);
    const exactlyOnce =
      check.jobs === killJobs &&
      check.completed === killJobs &&
      check.notOneSuccess === 0 &&
      check.notOneOutput === 0 &&
      check.outputNotOfWinner === 0 &&
      check.missingFiles === 0 &&
      check.queueCompleted === killJobs;

    const one = throughput.get(1) ?? [];
    const ceiling = `${slots} slots × ${latencyMs} ms per worker`;
    measures.push(
      {
        scenario: 'hosts',
        metric: `throughput, 1 worker host (${ceiling})`,
        unit: 'jobs/s',
        ours: one,
        better: 'higher',
        note: `ceiling ${perWorkerPerSecond} jobs/s per worker host; each phase: a fresh database, the whole backlog (≈ ${phaseSeconds} s of work) submitted through the API before the workers start, throughput = the sum over worker hosts of each one's completions / (its first attempt start → its last completion); Postgres, API, client and workers each in a network namespace of their own (${RANGE} on a bridge).`,
      },
      ...[2, 3].map((w): Measure => ({
        scenario: 'hosts',
        metric: `throughput, ${w} worker hosts`,
        unit: 'jobs/s',
        ours: throughput.get(w) ?? [],
        baseline: one,
        baselineLabel: '1 worker host',
        better: 'higher',
        ratioAsTimes: true,
        target: { text: `≥ ${w === 2 ? '1.8' : '2.5'}× one host`, check: (_o, r) => (r ?? 0) >= (w === 2 ? 1.8 : 2.5) },
      })),
      {
        scenario: 'hosts',
        metric: `jobs completed exactly once, one of 3 worker hosts killed mid-run`,
        unit: 'jobs',
        ours: [check.completed],
        baseline: [killJobs],
        baselineLabel: 'submitted',
        better: 'higher',
        target: { text: 'all, exactly once', check: () => exactlyOnce },
        note: `${check.recovered} jobs had an interrupted attempt (the killed host's) and were finished by another; ${check.attempts} attempts for ${check.jobs} jobs; jobs without exactly one succeeded attempt ${check.notOneSuccess}, without exactly one output ${check.notOneOutput}, whose output is not the winning attempt's ${check.outputNotOfWinner}; output files missing ${check.missingFiles}, stray (left by the killed attempts, removed by maintenance after an hour) ${check.strayFiles}; completed queue entries ${check.queueCompleted}.`,
      },
    );
    return measures;
  } finally {
    await Promise.all(children.map((c) => stopChild(c, 10_000).catch(() => c.kill('SIGKILL'))));
    cleanup();
    process.removeListener('exit', cleanup);
  }
}
