// Real worker processes (test/support/worker-main.ts) that tests start, signal and kill.
import { fork, type ChildProcess } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { withClient } from './postgres.ts';

const workerMain = fileURLToPath(new URL('./worker-main.ts', import.meta.url));

export interface WorkerProcess {
  child: ChildProcess;
  /** Job ids whose generation started in this process, in order. */
  started: string[];
  /** Resolves with the exit code (or signal) once the process has exited. */
  exited: Promise<number | string>;
  /** Resolves when the process has started `n` generations. */
  whenStarted(n: number): Promise<void>;
}

export async function startWorkerProcess(databaseUrl: string, env: Record<string, string>): Promise<WorkerProcess> {
  const child = fork(workerMain, [], {
    env: {
      PATH: process.env.PATH,
      DATABASE_URL: databaseUrl,
      LOG_LEVEL: process.env.TEST_LOG_LEVEL ?? 'silent',
      RUN_MIGRATIONS: 'false',
      DATABASE_POOL_MAX: '5',
      WORKER_POLL_INTERVAL_SECONDS: '0.5',
      WORKER_SUPERVISE_INTERVAL_SECONDS: '1',
      ...env,
    },
    execArgv: [],
    stdio: ['ignore', 'inherit', 'inherit', 'ipc'],
  });
  const started: string[] = [];
  const waiters: { n: number; resolve: () => void }[] = [];
  const exited = new Promise<number | string>((resolve) => child.on('exit', (code, signal) => resolve(code ?? signal ?? 'unknown')));
  const ready = new Promise<void>((resolve, reject) => {
    child.on('message', (m: { event: string; jobId?: string }) => {
      if (m.event === 'ready') resolve();
      if (m.event === 'generate' && m.jobId) {
        started.push(m.jobId);
        for (const w of waiters.filter((w) => started.length >= w.n)) w.resolve();
      }
    });
    void exited.then((code) => reject(new Error(`worker process exited before it was ready (${code})`)));
  });
  await ready;
  return {
    child,
    started,
    exited,
    whenStarted: (n) => (started.length >= n ? Promise.resolve() : new Promise((resolve) => waiters.push({ n, resolve }))),
  };
}

export async function createCallLog(databaseUrl: string): Promise<void> {
  await withClient(databaseUrl, (c) =>
    c.query('create table test_provider_calls (job_id uuid not null, pid int not null, at timestamptz not null default now())'),
  );
}

/** Provider calls per job id. */
export async function providerCalls(databaseUrl: string): Promise<Map<string, number>> {
  const rows = await withClient(databaseUrl, async (c) => (await c.query('select job_id, count(*)::int as n from test_provider_calls group by job_id')).rows);
  return new Map(rows.map((r: { job_id: string; n: number }) => [r.job_id, r.n]));
}

export interface ApiProcess {
  child: ChildProcess;
  baseUrl: string;
  stop(): Promise<void>;
}

/** A real API process (src/main-api.ts, as production runs it) on an ephemeral loopback port. */
export async function startApiProcess(databaseUrl: string, env: Record<string, string>): Promise<ApiProcess> {
  const child = fork(fileURLToPath(new URL('../../src/main-api.ts', import.meta.url)), [], {
    env: {
      PATH: process.env.PATH,
      DATABASE_URL: databaseUrl,
      PORT: '0',
      HOST: '127.0.0.1',
      LOG_LEVEL: 'info',
      RUN_MIGRATIONS: 'false',
      DATABASE_POOL_MAX: '5',
      ...env,
    },
    execArgv: [],
    stdio: ['ignore', 'pipe', 'inherit', 'ipc'],
  });
  const exited = new Promise<void>((resolve) => child.on('exit', () => resolve()));
  const port = await new Promise<number>((resolve, reject) => {
    let buffered = '';
    child.stdout!.on('data', (chunk: Buffer) => {
      buffered += chunk.toString('utf8');
      for (let nl = buffered.indexOf('\n'); nl >= 0; nl = buffered.indexOf('\n')) {
        const line = buffered.slice(0, nl);
        buffered = buffered.slice(nl + 1);
        if (process.env.TEST_LOG_LEVEL) process.stdout.write(`${line}\n`);
        try {
          const entry = JSON.parse(line) as { msg?: string; port?: number };
          if (entry.msg === 'API listening' && entry.port) resolve(entry.port);
        } catch {
          // not a log line
        }
      }
    });
    void exited.then(() => reject(new Error('the API process exited before it listened')));
  });
  return {
    child,
    baseUrl: `http://127.0.0.1:${port}`,
    stop: async () => {
      child.kill('SIGTERM');
      await exited;
    },
  };
}
