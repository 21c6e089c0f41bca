// The first ten minutes with real `npm start` processes: two in one folder, ports taken, Ctrl-C with a
// job running. Each runs `node src/main.ts` (API, worker, embedded Postgres) in its own process group.
import { existsSync, readFileSync, rmSync } from 'node:fs';
import path from 'node:path';
import pg from 'pg';
import { startEmbeddedPostgres } from '../src/db/embedded-postgres.ts';
import { waitForStatus } from './support/harness.ts';
import { freePort, kill, killPostgres, newFolder, startListening, startServiceProcess, type ServiceProcess } from './support/service-process.ts';

const started: ServiceProcess[] = [];
const folders: string[] = [];
afterEach(() => {
  for (const p of started.splice(0)) kill(p);
  for (const folder of folders.splice(0)) {
    killPostgres(path.join(folder, '.data'));
    rmSync(folder, { recursive: true, force: true });
  }
});

function folder(): string {
  const f = newFolder();
  folders.push(f);
  return f;
}
function track<T extends ServiceProcess>(p: T): T {
  started.push(p);
  return p;
}

async function submit(baseUrl: string, prompt: string): Promise<string> {
  const res = await fetch(`${baseUrl}/generate`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ prompt, parameters: { width: 64, height: 64 } }),
  });
  expect(res.status).toBe(202);
  return ((await res.json()) as { job_id: string }).job_id;
}

test('the service says where it listens, in a line a person reads', async () => {
  const first = track(await startListening(folder()));
  const line = first.logs.find((l) => l.msg.startsWith('media-gen-service listening on'))!;
  expect(line.msg).toContain(`http://localhost:${first.port}`);
  expect((await fetch(`${first.baseUrl}/readyz`)).status).toBe(200);
});

test('a second npm start in the same folder refuses, naming DATA_DIR and PORT; the first keeps working', async () => {
  const cwd = folder();
  const first = track(await startListening(cwd));
  const pgPid = readFileSync(path.join(cwd, '.data', 'postgres', 'postmaster.pid'), 'utf8').split('\n')[0];

  const second = track(startServiceProcess(cwd, { PORT: String(await freePort()), EMBEDDED_PG_PORT: String(await freePort()) }));
  expect(await second.exited).toBe(1);
  const refusal = second.logs.find((l) => l.level === 60)!;
  expect(refusal.msg).toContain('DATA_DIR=.data');
  expect(refusal.msg).toContain(`PORT=${first.port}`);
  expect(refusal.msg).toContain(`pid ${first.child.pid}`);
  expect(second.output()).not.toMatch(/orphan/);
  expect(second.output()).not.toMatch(/\n\s+at /); // no stack trace

  // the first instance's database was left alone: same server, and jobs still complete
  expect(readFileSync(path.join(cwd, '.data', 'postgres', 'postmaster.pid'), 'utf8').split('\n')[0]).toBe(pgPid);
  expect((await fetch(`${first.baseUrl}/readyz`)).status).toBe(200);
  const id = await submit(first.baseUrl, 'still working');
  expect(await waitForStatus(first.baseUrl, id)).toMatchObject({ status: 'completed' });
});

test('a taken PORT or EMBEDDED_PG_PORT is named, without a stack trace', async () => {
  const first = track(await startListening(folder()));
  const samePort = track(startServiceProcess(folder(), { PORT: String(first.port), EMBEDDED_PG_PORT: String(await freePort()) }));
  expect(await samePort.exited).toBe(1);
  expect(samePort.logs.find((l) => l.level === 60)!.msg).toMatch(new RegExp(`^PORT ${first.port} is already in use`));

  const pgPort = readFileSync(path.join(first.cwd, '.data', 'postgres', 'postmaster.pid'), 'utf8').split('\n')[3];
  const samePgPort = track(startServiceProcess(folder(), { PORT: String(await freePort()), EMBEDDED_PG_PORT: pgPort }));
  expect(await samePgPort.exited).toBe(1);
  expect(samePgPort.logs.find((l) => l.level === 60)!.msg).toContain(`EMBEDDED_PG_PORT to a free port (now ${pgPort})`);
  for (const p of [samePort, samePgPort]) expect(p.output()).not.toMatch(/\n\s+at /);
  expect((await fetch(`${first.baseUrl}/readyz`)).status).toBe(200);
});

test('Ctrl-C (SIGINT to the process group) drains the running job, then stops Postgres, with no error logged', async () => {
  const cwd = folder();
  const svc = track(await startListening(cwd, { LOCAL_PROVIDER_LATENCY_MS: '3000' }));
  const id = await submit(svc.baseUrl, 'drained');
  await waitForStatus(svc.baseUrl, id, ['processing']);

  process.kill(-svc.child.pid!, 'SIGINT'); // what a terminal does on Ctrl-C: the whole foreground group
  expect(await svc.exited).toBe(0);

  const messages = svc.logs.map((l) => l.msg);
  expect(messages.indexOf('stopped')).toBe(messages.length - 1);
  expect(svc.logs.filter((l) => l.level >= 50)).toEqual([]); // no error, no fatal
  expect(svc.output()).not.toMatch(/terminating connection|\n\s+at /);
  expect(existsSync(path.join(cwd, '.data', 'postgres', 'postmaster.pid'))).toBe(false); // Postgres stopped cleanly
  expect(existsSync(path.join(cwd, '.data', 'owner.json'))).toBe(false);

  // The job finished before the database went away: completed, in one attempt.
  const db = await startEmbeddedPostgres({ dataDir: path.join(cwd, '.data', 'postgres'), port: await freePort() });
  try {
    const client = new pg.Client({ connectionString: db.url });
    await client.connect();
    const { rows } = await client.query<{ status: string; attempts: number }>('select status, attempts from jobs where id = $1', [id]);
    await client.end();
    expect(rows).toEqual([{ status: 'completed', attempts: 1 }]);
  } finally {
    await db.stop();
  }
});
