// The README's curl lines, run as written against a real server: only the host's port and the
// placeholders a reader fills in (a job id, a result_url, a cursor, $KEY) are replaced. Each must
// succeed (curl --fail-with-body: no 4xx, no 5xx).
import { execFile } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, statSync } from 'node:fs';
import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import { createLocalProvider } from '../src/providers/local.provider.ts';
import type { ImageProvider } from '../src/providers/provider.ts';
import { createApiKey, startTestService, submit, waitFor, waitForStatus, type TestService } from './support/harness.ts';

const readme = readFileSync(fileURLToPath(new URL('../README.md', import.meta.url)), 'utf8');

/** The shell commands of the README's ```sh blocks, continuation lines and multi-line quotes joined. */
function shellCommands(markdown: string): string[] {
  const commands: string[] = [];
  for (const block of markdown.matchAll(/^\s*```sh\n([\s\S]*?)^\s*```/gm)) {
    let current = '';
    for (const line of block[1].split('\n')) {
      if (!current && (line.trim() === '' || line.trim().startsWith('#'))) continue;
      current += (current ? '\n' : '') + line;
      const openQuote = (current.match(/'/g) ?? []).length % 2 === 1;
      if (openQuote || current.endsWith('\\')) continue;
      commands.push(current.trim());
      current = '';
    }
  }
  return commands;
}

const curls = shellCommands(readme).filter((c) => c.startsWith('curl '));

let svc: TestService;
let receiver: Server;
const deliveries: string[] = [];
let cwd: string;
const run = promisify(execFile);

beforeAll(async () => {
  receiver = createServer((req, res) => {
    let body = '';
    req.on('data', (c: Buffer) => (body += c.toString()));
    req.on('end', () => {
      deliveries.push(body);
      res.end();
    });
  });
  await new Promise<void>((resolve) => receiver.listen(0, '127.0.0.1', resolve));
  // The local generator, except for a job the cancel example can cancel: it runs until canceled.
  const local = createLocalProvider({ latencyMs: 0 });
  const provider: ImageProvider = {
    name: 'local',
    generate: (request, signal, hooks) =>
      request.prompt === 'held until canceled'
        ? new Promise((_resolve, reject) => signal.addEventListener('abort', () => reject(signal.reason as Error)))
        : local.generate(request, signal, hooks),
  };
  svc = await startTestService({ provider, env: { WEBHOOK_ALLOWED_CIDRS: '127.0.0.0/8,::1/128' } });
  cwd = mkdtempSync(path.join(tmpdir(), 'readme-'));
});
afterAll(async () => {
  await svc?.stop();
  receiver?.close();
  rmSync(cwd, { recursive: true, force: true });
});

test('the README has curl examples, all aimed at the local service', () => {
  expect(curls.length).toBeGreaterThanOrEqual(15);
  for (const command of curls) expect(command).toMatch(/^curl .*localhost:8000\//s);
  expect(curls.filter((c) => /https?:\/\/(?!localhost)/.test(c))).toEqual([]); // nothing posts to a real host
});

test('every curl line runs as written against a real server', async () => {
  const done = ((await (await submit(svc.baseUrl, { prompt: 'the README job' })).json()) as { job_id: string }).job_id;
  const completed = await waitForStatus(svc.baseUrl, done);
  expect(completed.status).toBe('completed');
  const held = ((await (await submit(svc.baseUrl, { prompt: 'held until canceled' })).json()) as { job_id: string }).job_id;
  const page = (await (await fetch(`${svc.baseUrl}/jobs?limit=1`)).json()) as { next_cursor: string };
  const key = await createApiKey(svc.databaseUrl, { name: 'readme' });
  const port = (receiver.address() as AddressInfo).port;

  const failures: string[] = [];
  for (const written of curls) {
    const id = written.includes('/cancel') ? held : done;
    const command = written
      .replace(/^curl /, 'curl --fail-with-body -sS ')
      .replaceAll('localhost:8000', `127.0.0.1:${new URL(svc.baseUrl).port}`)
      .replaceAll('localhost:9000', `127.0.0.1:${port}`)
      .replace(/\/media\/4b1c\S*/, completed.result_url!)
      .replaceAll('4b1c…', id)
      .replace('<next_cursor of the previous page>', page.next_cursor);
    try {
      await run('bash', ['--norc', '--noprofile', '-c', command], { cwd, env: { PATH: process.env.PATH, KEY: key } });
    } catch (err) {
      const e = err as { code?: number; stdout?: string; stderr?: string };
      failures.push(`${written}\n  → exit ${e.code}: ${e.stdout ?? ''}${e.stderr ?? ''}`);
    }
  }
  expect(failures).toEqual([]);

  expect(statSync(path.join(cwd, 'city.png')).size).toBe(completed.outputs[0].bytes); // the quick start's download
  expect((await waitForStatus(svc.baseUrl, held)).status).toBe('canceled');
  // the webhook example's delivery reached the receiver on this machine
  await waitFor(async () => (deliveries.some((d) => d.includes('"status":"completed"')) ? true : undefined), 'a webhook delivery');
});
