// `npm start` as a user runs it: `node src/main.ts` (API, worker, embedded Postgres) in a folder of its
// own, in a process group of its own (as a terminal's foreground job), its JSON log lines collected.
import { spawn, type ChildProcess } from 'node:child_process';
import { chmodSync, mkdtempSync, readFileSync } from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const mainTs = fileURLToPath(new URL('../../src/main.ts', import.meta.url));

export interface LogLine {
  level: number;
  msg: string;
  [key: string]: unknown;
}

export interface ServiceProcess {
  child: ChildProcess;
  cwd: string;
  logs: LogLine[];
  /** Everything the process wrote, as text (stdout and stderr). */
  output(): string;
  /** Resolves with the exit code (or signal name). */
  exited: Promise<number | string>;
  /** Resolves with the first log line matching, or rejects if the process exits first. */
  waitForLog(match: (line: LogLine) => boolean, what: string): Promise<LogLine>;
}

/** A port nothing listens on right now. */
export async function freePort(): Promise<number> {
  const server = createServer();
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const { port } = server.address() as { port: number };
  await new Promise<void>((resolve) => server.close(() => resolve()));
  return port;
}

export function newFolder(prefix = 'first-run-'): string {
  const folder = mkdtempSync(path.join(tmpdir(), prefix));
  // mkdtemp makes it 0700: as root, the embedded Postgres (run as `postgres`) could not reach a data dir
  // inside it and would be placed under /var/tmp instead, outliving the folder's cleanup.
  chmodSync(folder, 0o755);
  return folder;
}

export function startServiceProcess(cwd: string, env: Record<string, string>): ServiceProcess {
  const child = spawn(process.execPath, ['--max-semi-space-size=2', mainTs], {
    cwd,
    env: { PATH: process.env.PATH, HOME: process.env.HOME, HOST: '127.0.0.1', LOG_LEVEL: 'info', ...env },
    detached: true, // its own process group, like `npm start` in a terminal: Ctrl-C signals the group
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  const logs: LogLine[] = [];
  let text = '';
  const waiters = new Set<() => void>();
  let buffer = '';
  child.stdout.on('data', (chunk: Buffer) => {
    text += chunk.toString();
    buffer += chunk.toString();
    let nl: number;
    while ((nl = buffer.indexOf('\n')) >= 0) {
      const line = buffer.slice(0, nl);
      buffer = buffer.slice(nl + 1);
      try {
        logs.push(JSON.parse(line) as LogLine);
      } catch {
        logs.push({ level: 0, msg: line });
      }
      for (const wake of waiters) wake();
    }
  });
  child.stderr.on('data', (chunk: Buffer) => {
    text += chunk.toString();
  });
  const exited = new Promise<number | string>((resolve) => child.on('exit', (code, signal) => resolve(code ?? signal ?? 'unknown')));
  void exited.then(() => {
    for (const wake of waiters) wake();
  });
  let done = false;
  void exited.then(() => (done = true));
  return {
    child,
    cwd,
    logs,
    output: () => text,
    exited,
    waitForLog: (match, what) =>
      new Promise((resolve, reject) => {
        const check = () => {
          const found = logs.find(match);
          if (found) {
            waiters.delete(check);
            resolve(found);
          } else if (done) {
            waiters.delete(check);
            reject(new Error(`the process exited before logging ${what}:\n${text}`));
          }
        };
        waiters.add(check);
        check();
      }),
  };
}

/** Starts a service process and waits until it listens; returns it with its base URL. */
export async function startListening(cwd: string, env: Record<string, string> = {}): Promise<ServiceProcess & { port: number; baseUrl: string }> {
  const port = await freePort();
  const pgPort = await freePort();
  const proc = startServiceProcess(cwd, { PORT: String(port), EMBEDDED_PG_PORT: String(pgPort), ...env });
  await proc.waitForLog((l) => l.msg.startsWith('media-gen-service listening on'), 'that it listens');
  return Object.assign(proc, { port, baseUrl: `http://127.0.0.1:${port}` });
}

/** Stops a process (and its group) for good, if it still runs. */
export function kill(proc: ServiceProcess): void {
  if (proc.child.exitCode === null && proc.child.signalCode === null) {
    try {
      process.kill(-proc.child.pid!, 'SIGKILL');
    } catch {
      // already gone
    }
  }
}

/** Stops the embedded Postgres a service process left in `dataDir` (after a test that failed midway). */
export function killPostgres(dataDir: string): void {
  try {
    const pid = Number(readFileSync(path.join(dataDir, 'postgres', 'postmaster.pid'), 'utf8').split('\n')[0]);
    if (pid > 0) process.kill(pid, 'SIGQUIT');
  } catch {
    // not running
  }
}
