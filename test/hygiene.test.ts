// Hygiene: instants and cursors Postgres cannot store are 400s naming the parameter (never a 500);
// every answer carries the security headers; logs of a real process never show a key, a proxy
// credential or a webhook_url's query string.
import { spawn } from 'node:child_process';
import { createServer, type Server } from 'node:http';
import { mkdtempSync, rmSync } from 'node:fs';
import type { AddressInfo } from 'node:net';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { pino } from 'pino';
import { createLogger } from '../src/logger.ts';
import { createTestDatabase, startTestService, submit, waitFor, waitForStatus, type TestService } from './support/harness.ts';
import { withClient } from './support/postgres.ts';

let svc: TestService | undefined;
afterEach(async () => {
  await svc?.stop();
  svc = undefined;
});

interface ProblemBody {
  status: number;
  errors?: { path: string; message: string }[];
}

const cursorOf = (at: string, id: string) => Buffer.from(JSON.stringify([at, id])).toString('base64url');

describe('instants and cursors Postgres cannot store', () => {
  const badInstants = [
    '2026-11-01T25:00:00Z', // hour 25
    '2023-12-31T23:59:60Z', // a leap second (RFC 3339 allows it; neither Date nor Postgres holds it)
    '2026-11-01T10:00:00+24:00', // offset out of range
    '2026-02-30T00:00:00Z', // no such day (Date would roll it over to March 2)
    '-271821-04-20T00:00:00Z', // the earliest Date there is; Postgres starts at 4713 BC
    '+275760-09-13T00:00:00Z',
    '0000-01-01T00:00:00Z',
  ];

  test.each(['created_after', 'created_before'])('%s: each is a 400 naming the parameter', async (name) => {
    svc = await startTestService({ worker: false });
    const good = await fetch(`${svc.baseUrl}/jobs?${name}=${encodeURIComponent('2026-11-01T10:00:00+01:00')}`);
    expect(good.status).toBe(200); // the parameter works: the 400s below are about the values
    for (const value of badInstants) {
      const res = await fetch(`${svc.baseUrl}/jobs?${name}=${encodeURIComponent(value)}`);
      const body = (await res.json()) as ProblemBody;
      if (res.status !== 400) throw new Error(`${name}=${value} was answered ${res.status}: ${JSON.stringify(body)}`);
      expect(res.headers.get('content-type')).toMatch(/^application\/problem\+json/);
      expect(body.errors?.map((e) => e.path)).toContain(`/query/${name}`);
    }
  });

  test('cursors that decode to an unstorable instant or a malformed id are a 400 naming the cursor', async () => {
    svc = await startTestService({ worker: false });
    for (let i = 0; i < 2; i++) expect((await submit(svc.baseUrl, { prompt: `page ${i}` })).status).toBe(202);
    const first = (await (await fetch(`${svc.baseUrl}/jobs?limit=1`)).json()) as { next_cursor?: string };
    expect(first.next_cursor).toBeDefined();
    expect((await fetch(`${svc.baseUrl}/jobs?limit=1&cursor=${first.next_cursor}`)).status).toBe(200); // a real one works

    const id = '7d9f7a64-3f9c-4d4c-9a55-0c1e0d6f8a11';
    const bad = [
      cursorOf('2026-01-01T00:00:00.000Z', '-'.repeat(36)),
      cursorOf('2026-01-01T00:00:00.000Z', 'z'.repeat(36)),
      cursorOf('-271821-04-20T00:00:00.000Z', id),
      cursorOf('+275760-09-13T00:00:00.000Z', id),
      cursorOf('2023-12-31T23:59:60Z', id),
      cursorOf('2026-11-01T25:00:00Z', id),
      Buffer.from(JSON.stringify([0, id])).toString('base64url'),
      Buffer.from(JSON.stringify({ at: 1 })).toString('base64url'),
      'bm90IGpzb24',
    ];
    for (const cursor of bad) {
      const res = await fetch(`${svc.baseUrl}/jobs?cursor=${cursor}`);
      const body = (await res.json()) as ProblemBody;
      if (res.status !== 400) throw new Error(`cursor ${Buffer.from(cursor, 'base64url').toString()} was answered ${res.status}: ${JSON.stringify(body)}`);
      expect(body.errors?.map((e) => e.path)).toEqual(['/query/cursor']);
    }
  });
});

describe('security headers', () => {
  test('on every kind of answer: JSON, problem, spec, docs, media, 404', async () => {
    svc = await startTestService();
    const res = await submit(svc.baseUrl, { prompt: 'headers' });
    const { job_id } = (await res.json()) as { job_id: string };
    const done = await waitForStatus(svc.baseUrl, job_id, ['completed']);

    const answers: [string, Response][] = [['POST /generate', res]];
    for (const p of [
      '/healthz',
      `/status/${job_id}`,
      '/jobs?limit=nope',
      '/openapi.yaml',
      '/docs/',
      '/docs/swagger-ui.css',
      '/no/such/route',
      done.result_url!,
    ]) {
      answers.push([`GET ${p}`, await fetch(`${svc.baseUrl}${p}`)]);
    }
    const statuses = answers.map(([what, r]) => `${what} ${r.status}`);
    expect(statuses).toContain('GET /jobs?limit=nope 400');
    expect(statuses).toContain('GET /no/such/route 404');
    expect(statuses).toContain('GET /docs/ 200');
    for (const [what, r] of answers) {
      const csp = r.headers.get('content-security-policy') ?? '';
      const seen = {
        what,
        nosniff: r.headers.get('x-content-type-options'),
        defaultSrc: /(^|;)\s*default-src 'self'/.test(csp),
        scriptSrc: /script-src 'self'(;|$)/.test(csp),
        frameAncestors: /frame-ancestors 'self'/.test(csp),
      };
      expect(seen).toEqual({ what, nosniff: 'nosniff', defaultSrc: true, scriptSrc: true, frameAncestors: true });
    }
    // An image is per key: no shared cache may keep it.
    const media = answers.find(([what]) => what === `GET ${done.result_url}`)![1];
    expect(media.status).toBe(200);
    expect(media.headers.get('cache-control')).toMatch(/(^|,\s*)private(,|$)/);
    expect(media.headers.get('cache-control')).not.toMatch(/public/);
  });
});

describe('secrets never reach the logs', () => {
  const BEARER_KEY = 'mk_live_BEARER-S3CRET-1f2e3d';
  const API_KEY = 'xkey-S3CRET-9a8b7c';
  const PROXY = 'Basic cHJveHk6UFJPWFktUzNDUkVU';
  const HOOK_TOKEN = 'HOOKTOKEN-S3CRET-5566';
  const REFUSED_TOKEN = 'REFUSEDTOKEN-S3CRET-7788';
  const secrets = [BEARER_KEY, API_KEY, PROXY, PROXY.slice('Basic '.length), HOOK_TOKEN, REFUSED_TOKEN];

  function expectNoSecret(output: string): void {
    for (const secret of secrets) {
      if (output.includes(secret))
        throw new Error(
          `the log output contains ${JSON.stringify(secret)}:\n${output
            .split('\n')
            .filter((l) => l.includes(secret))
            .join('\n')}`,
        );
    }
  }

  test('the logger censors keys and headers, and keeps only the host and path of a URL', () => {
    const lines: string[] = [];
    const logger = createLogger('trace');
    (logger as unknown as Record<symbol, unknown>)[pino.symbols.streamSym] = { write: (s: string) => void lines.push(s) };
    const hook = `https://hooks.example.com/in/abc?token=${HOOK_TOKEN}#${HOOK_TOKEN}`;
    logger.info({ authorization: `Bearer ${BEARER_KEY}`, 'x-api-key': API_KEY, 'proxy-authorization': PROXY }, 'top level');
    logger.info({ headers: { authorization: `Bearer ${BEARER_KEY}`, 'x-api-key': API_KEY, 'proxy-authorization': PROXY } }, 'headers');
    logger.info(
      { req: { url: `/x?token=${HOOK_TOKEN}`, headers: { authorization: `Bearer ${BEARER_KEY}`, 'x-api-key': API_KEY, 'proxy-authorization': PROXY } } },
      'request',
    );
    logger.info({ webhook_url: hook, job: { webhook_url: hook }, delivery: { url: hook }, a: { b: { webhook_url: hook } } }, 'urls');
    const output = lines.join('');
    expectNoSecret(output);
    expect(output).toContain('https://hooks.example.com/in/abc'); // what helps debugging stays
    expect(output.match(/\[redacted\]/g)?.length).toBeGreaterThanOrEqual(9);
  });

  test('a real service process: requests with keys, a refused and a delivered webhook', async () => {
    let hits = 0;
    const receiver: Server = createServer((req, res) => {
      req.resume();
      hits += 1;
      res.writeHead(hits === 1 ? 500 : 200).end(); // a failed try is logged too
    });
    await new Promise<void>((r) => receiver.listen(0, '127.0.0.1', r));
    const databaseUrl = await createTestDatabase();
    const mediaDir = mkdtempSync(path.join(tmpdir(), 'media-hygiene-'));
    const child = spawn(process.execPath, [fileURLToPath(new URL('../src/main.ts', import.meta.url))], {
      cwd: mediaDir, // no .env here
      env: {
        PATH: process.env.PATH,
        DATABASE_URL: databaseUrl,
        RUN_MIGRATIONS: 'false',
        PORT: '0',
        HOST: '127.0.0.1',
        LOG_LEVEL: 'trace',
        MEDIA_DIR: mediaDir,
        WEBHOOK_ALLOWED_CIDRS: '127.0.0.1',
        WORKER_POLL_INTERVAL_SECONDS: '0.5',
      },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let output = '';
    child.stdout.on('data', (c: Buffer) => (output += c.toString()));
    child.stderr.on('data', (c: Buffer) => (output += c.toString()));
    const exited = new Promise((resolve) => child.on('exit', resolve));
    try {
      const port = await waitFor(async () => /"port":(\d+)[^\n]*"API listening"/.exec(output)?.[1], 'the API to listen');
      const base = `http://127.0.0.1:${port}`;
      const headers = { 'content-type': 'application/json', 'x-api-key': API_KEY, 'proxy-authorization': PROXY, 'x-request-id': 'hygiene-probe' };
      await fetch(`${base}/jobs`, { headers: { ...headers, authorization: `Bearer ${BEARER_KEY}` } }); // a key this server does not know
      await fetch(`${base}/healthz`, { headers: { ...headers, authorization: `Bearer ${BEARER_KEY}` } });
      const refused = await fetch(`${base}/generate`, {
        method: 'POST',
        headers,
        body: JSON.stringify({ prompt: 'refused', webhook_url: `http://10.9.8.7/in?token=${REFUSED_TOKEN}` }),
      });
      expect(refused.status).toBe(422);
      const hook = `http://127.0.0.1:${(receiver.address() as AddressInfo).port}/in?token=${HOOK_TOKEN}`;
      const accepted = await fetch(`${base}/generate`, { method: 'POST', headers, body: JSON.stringify({ prompt: 'hooked', webhook_url: hook }) });
      expect(accepted.status).toBe(202);
      const { job_id } = (await accepted.json()) as { job_id: string };
      await waitFor(
        async () =>
          withClient(databaseUrl, async (c) =>
            (await c.query("select 1 from webhook_deliveries where job_id = $1 and status = 'delivered'", [job_id])).rowCount ? true : undefined,
          ),
        'the webhook to be delivered after one failed try',
        30_000,
      );
      await waitFor(async () => (output.includes('"webhook delivered"') ? true : undefined), 'the delivery to be logged');
    } finally {
      child.kill('SIGTERM');
      await exited;
      await new Promise((r) => receiver.close(r));
      rmSync(mediaDir, { recursive: true, force: true });
    }
    // The log really holds these requests and deliveries, headers included…
    expect(output).toContain('hygiene-probe');
    expect(output).toContain('"x-api-key":"[redacted]"');
    expect(output).toContain('"proxy-authorization":"[redacted]"');
    expect(output).toContain('webhook delivery failed');
    expect(hits).toBe(2);
    // …and none of the secrets.
    expectNoSecret(output);
  });
});
