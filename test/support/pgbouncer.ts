// PgBouncer (Debian's package) in front of the test Postgres, for the tests of what works through a
// transaction-mode pooler. `ensurePgbouncer()` installs the package when it is missing (as root, with
// apt-get: the test run's global setup calls it, so a fresh machine needs no extra step);
// PGBOUNCER_PATH names another binary. `startPgbouncer()` runs one on a free loopback port.
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { chmodSync, chownSync, existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { connect } from 'node:net';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { freePort } from '../../scripts/free-port.ts';

const DEBIAN_BINARY = '/usr/sbin/pgbouncer';

/** The pgbouncer binary: PGBOUNCER_PATH, else Debian's, installed with apt-get if missing (root only). */
export function ensurePgbouncer(): string {
  const named = process.env.PGBOUNCER_PATH;
  if (named) return named;
  if (existsSync(DEBIAN_BINARY)) return DEBIAN_BINARY;
  if (process.getuid?.() !== 0) {
    throw new Error(`pgbouncer is not installed: run \`apt-get install -y pgbouncer\` as root (or set PGBOUNCER_PATH)`);
  }
  console.log('installing pgbouncer (apt-get install -y pgbouncer) for the PgBouncer tests…');
  const env = { ...process.env, DEBIAN_FRONTEND: 'noninteractive' };
  const install = () => spawnSync('apt-get', ['install', '-y', '--no-install-recommends', 'pgbouncer'], { env, encoding: 'utf8' });
  let result = install();
  if (result.status !== 0) {
    // A fresh machine has no package lists yet.
    spawnSync('apt-get', ['update'], { env, stdio: 'ignore' });
    result = install();
  }
  if (result.status !== 0 || !existsSync(DEBIAN_BINARY)) {
    throw new Error(
      `could not install pgbouncer with apt-get: ${(result.stderr || result.stdout || String(result.error)).trim().split('\n').slice(-3).join(' / ')}`,
    );
  }
  return DEBIAN_BINARY;
}

export interface PgBouncer {
  /** postgres://… through PgBouncer to `database` (the same user and password as the upstream URL). */
  url(database: string): string;
  port: number;
  /** PgBouncer's log so far. */
  log(): string;
  stop(): Promise<void>;
}

export interface PgBouncerOptions {
  poolMode?: 'transaction' | 'session' | 'statement';
  /** Server connections per database and user (PgBouncer's default_pool_size). */
  poolSize?: number;
}

/** Starts PgBouncer in front of the server of `upstreamUrl` (any database on it, same credentials). */
export async function startPgbouncer(upstreamUrl: string, options: PgBouncerOptions = {}): Promise<PgBouncer> {
  const binary = ensurePgbouncer();
  const upstream = new URL(upstreamUrl);
  const user = decodeURIComponent(upstream.username);
  const password = decodeURIComponent(upstream.password);
  const port = await freePort();
  const dir = mkdtempSync(path.join(tmpdir(), 'pgbouncer-'));
  const logFile = path.join(dir, 'pgbouncer.log');
  writeFileSync(path.join(dir, 'userlist.txt'), `"${user}" "${password}"\n`);
  writeFileSync(
    path.join(dir, 'pgbouncer.ini'),
    [
      '[databases]',
      `* = host=${upstream.hostname.replace(/^\[(.*)\]$/, '$1')} port=${upstream.port || 5432}`,
      '[pgbouncer]',
      'listen_addr = 127.0.0.1',
      `listen_port = ${port}`,
      'unix_socket_dir =',
      'auth_type = scram-sha-256',
      `auth_file = ${path.join(dir, 'userlist.txt')}`,
      `pool_mode = ${options.poolMode ?? 'transaction'}`,
      `default_pool_size = ${options.poolSize ?? 20}`,
      'max_client_conn = 1000',
      `logfile = ${logFile}`,
      'log_connections = 0',
      'log_disconnections = 0',
      '',
    ].join('\n'),
  );
  // PgBouncer refuses to run as root: as root, it runs as nobody (who must read and write its folder).
  const asRoot = process.getuid?.() === 0;
  if (asRoot) {
    for (const f of ['', 'userlist.txt', 'pgbouncer.ini']) chownSync(path.join(dir, f), 65534, 65534);
    chmodSync(dir, 0o700);
  }
  const child: ChildProcess = spawn(binary, [path.join(dir, 'pgbouncer.ini')], {
    stdio: 'ignore',
    ...(asRoot ? { uid: 65534, gid: 65534 } : {}),
  });
  const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
  const log = () => (existsSync(logFile) ? readFileSync(logFile, 'utf8') : '');
  let dead = false;
  void exited.then(() => (dead = true));
  // Ready when it accepts a connection.
  for (;;) {
    if (dead) {
      rmSync(dir, { recursive: true, force: true });
      throw new Error(`pgbouncer exited at start: ${log().trim().split('\n').slice(-3).join(' / ')}`);
    }
    if (await accepts(port)) break;
    await new Promise((r) => setTimeout(r, 50));
  }
  return {
    port,
    url(database) {
      const url = new URL(upstreamUrl);
      url.hostname = '127.0.0.1';
      url.port = String(port);
      url.pathname = `/${database}`;
      return url.toString();
    },
    log,
    async stop() {
      if (!dead) {
        child.kill('SIGTERM'); // immediate shutdown
        await exited;
      }
      rmSync(dir, { recursive: true, force: true });
    },
  };
}

function accepts(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const socket = connect({ host: '127.0.0.1', port });
    socket.once('connect', () => {
      socket.destroy();
      resolve(true);
    });
    socket.once('error', () => resolve(false));
  });
}
