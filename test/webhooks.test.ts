// Webhooks: signed like Replicate's, delivered for the chosen events, retried with backoff through the
// queue, and recorded.
import { spawn } from 'node:child_process';
import { createHmac, timingSafeEqual } from 'node:crypto';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { createServer, type IncomingHttpHeaders, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { createMediaClient } from '../src/client/index.ts';
import { enqueueWebhook, signWebhook } from '../src/webhooks/webhook.service.ts';
import { withClient } from './support/postgres.ts';
import { mediaPath } from './support/media-names.ts';
import { startTestService, waitFor, waitForStatus, type TestService } from './support/harness.ts';

interface Received {
  headers: IncomingHttpHeaders;
  body: string;
}

/** The README's verification example: Standard Webhooks, as Replicate documents it. */
function verify(secret: string, headers: IncomingHttpHeaders, body: string, toleranceSeconds = 300): boolean {
  const id = headers['webhook-id'] as string;
  const timestamp = headers['webhook-timestamp'] as string;
  const signatures = (headers['webhook-signature'] as string).split(' ');
  if (Math.abs(Date.now() / 1000 - Number(timestamp)) > toleranceSeconds) return false;
  const key = Buffer.from(secret.split('_')[1], 'base64');
  const expected = createHmac('sha256', key).update(`${id}.${timestamp}.${body}`).digest();
  return signatures.some((s) => {
    const given = Buffer.from(s.split(',')[1] ?? '', 'base64');
    return given.length === expected.length && timingSafeEqual(given, expected);
  });
}

let receiver: Server;
let received: Received[];
let answers: number[]; // status codes to answer, in turn; 200 once exhausted
let svc: TestService;

beforeEach(async () => {
  received = [];
  answers = [];
  receiver = createServer((req, res) => {
    let body = '';
    req.on('data', (c) => (body += c));
    req.on('end', () => {
      received.push({ headers: req.headers, body });
      res.writeHead(answers.shift() ?? 200).end();
    });
  });
  await new Promise<void>((r) => receiver.listen(0, '127.0.0.1', r));
});
afterEach(async () => {
  await svc?.stop();
  await new Promise((r) => receiver.close(r));
});

// Receivers run on this machine, which webhooks may only reach when allowed (README "Security").
const allowLoopback = { WEBHOOK_ALLOWED_CIDRS: '127.0.0.0/8' };
const hookUrl = () => `http://127.0.0.1:${(receiver.address() as AddressInfo).port}/hooks/media`;

test('start and completed deliveries, signed so that a receiver can verify them', async () => {
  svc = await startTestService({ env: allowLoopback });
  const api = createMediaClient(svc.baseUrl);
  const { data } = await api.POST('/generate', { body: { prompt: 'hooked', webhook_url: hookUrl(), webhook_events_filter: ['start', 'completed'] } });
  const id = data!.job_id;
  await waitForStatus(svc.baseUrl, id, ['completed']);
  await waitFor(async () => (received.length >= 2 ? true : undefined), 'two deliveries');

  const secret = (await api.GET('/webhooks/secret')).data!.key;
  expect(secret).toMatch(/^whsec_[A-Za-z0-9+/]+=*$/);
  const bodies = received.map((r) => JSON.parse(r.body));
  expect(bodies.map((b) => b.status)).toEqual(['processing', 'completed']);
  expect(bodies[1]).toMatchObject({ job_id: id, result_url: expect.stringMatching(mediaPath(id, 1, 'png')) });
  for (const r of received) {
    expect(r.headers['content-type']).toBe('application/json');
    expect(verify(secret, r.headers, r.body)).toBe(true);
    expect(verify(secret, r.headers, r.body.replace('hooked', 'forged'))).toBe(false);
  }
  expect(new Set(received.map((r) => r.headers['webhook-id'])).size).toBe(2);
  expect(await (await fetch(`${svc.baseUrl}/status/${id}`)).json()).toMatchObject({ webhook_url: hookUrl(), webhook_events_filter: ['start', 'completed'] });
});

test('a configured secret signs; by default only the completed event is sent', async () => {
  const secret = `whsec_${Buffer.from('a configured key of thirty-two b').toString('base64')}`;
  svc = await startTestService({ env: { ...allowLoopback, WEBHOOK_SECRET: secret } });
  const api = createMediaClient(svc.baseUrl);
  const { data } = await api.POST('/generate', { body: { prompt: 'default filter', webhook_url: hookUrl() } });
  await waitForStatus(svc.baseUrl, data!.job_id, ['completed']);
  const [delivery] = await waitFor(async () => (received.length >= 1 ? received : undefined), 'a delivery');
  expect(received).toHaveLength(1);
  expect(JSON.parse(delivery.body).status).toBe('completed');
  const { 'webhook-id': wid, 'webhook-timestamp': ts } = delivery.headers as Record<string, string>;
  expect(delivery.headers['webhook-signature']).toBe(signWebhook(secret, wid, Number(ts), delivery.body));
  expect(verify(secret, delivery.headers, delivery.body)).toBe(true);
});

test('a failing receiver is retried with backoff until it accepts, and every try is recorded', async () => {
  svc = await startTestService({ env: allowLoopback });
  answers = [500, 503];
  const api = createMediaClient(svc.baseUrl);
  const { data } = await api.POST('/generate', { body: { prompt: 'flaky receiver', webhook_url: hookUrl() } });
  const row = await waitFor(
    async () =>
      withClient(svc.databaseUrl, async (c) => {
        const r = (await c.query("select * from webhook_deliveries where job_id = $1 and status = 'delivered'", [data!.job_id])).rows[0];
        return r ?? undefined;
      }),
    'the delivery to succeed',
    30_000,
  );
  expect(row).toMatchObject({ attempts: 3, last_status_code: 200, event: 'completed' });
  expect(row.history.map((h: { status_code: number }) => h.status_code)).toEqual([500, 503, 200]);
  // the same delivery id on every try, so receivers can deduplicate
  expect(new Set(received.map((r) => r.headers['webhook-id'])).size).toBe(1);
  const gaps = row.history.slice(1).map((h: { at: string }, i: number) => Date.parse(h.at) - Date.parse(row.history[i].at));
  expect(gaps[0]).toBeGreaterThanOrEqual(900); // retryDelay 1 s, exponential
});

test('a webhook_url that is not http(s) is a 400 naming the field', async () => {
  svc = await startTestService({ worker: false });
  const res = await fetch(`${svc.baseUrl}/generate`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ prompt: 'p', webhook_url: 'file:///etc/passwd' }),
  });
  expect(res.status).toBe(400);
  expect(JSON.stringify(await res.json())).toContain('/body/webhook_url');
});

/** A receiver on `host` that takes requests and never answers; it counts what it holds. */
async function silentReceiver(host: string): Promise<{ url: string; open: () => number; maxOpen: () => number; close: () => Promise<void> }> {
  let open = 0;
  let maxOpen = 0;
  const server = createServer((req, res) => {
    open += 1;
    maxOpen = Math.max(maxOpen, open);
    res.on('close', () => (open -= 1));
  });
  await new Promise<void>((r) => server.listen(0, host, r));
  return {
    url: `http://${host}:${(server.address() as AddressInfo).port}/hooks/silent`,
    open: () => open,
    maxOpen: () => maxOpen,
    close: async () => {
      server.closeAllConnections();
      await new Promise((r) => server.close(r));
    },
  };
}

describe('one slow receiver cannot delay the others', () => {
  // Silent receivers hold their requests for WEBHOOK_TIMEOUT_MS (2 minutes): had the healthy delivery
  // waited behind them, they would have timed out (attempts > 0) before it arrived. No clock is read.
  const env = { ...allowLoopback, WEBHOOK_TIMEOUT_MS: '120000' };

  async function submitHooked(urls: string[]): Promise<void> {
    for (const url of urls)
      expect((await createMediaClient(svc.baseUrl).POST('/generate', { body: { prompt: 'to a silent receiver', webhook_url: url } })).response.status).toBe(
        202,
      );
  }

  async function silentRows(urls: string[]) {
    return withClient(
      svc.databaseUrl,
      async (c) =>
        (await c.query('select status, attempts from webhook_deliveries where url = any($1)', [urls])).rows as { status: string; attempts: number }[],
    );
  }

  async function expectHealthyDeliveryFirst(silentUrls: string[]): Promise<void> {
    const { data } = await createMediaClient(svc.baseUrl).POST('/generate', { body: { prompt: 'healthy', webhook_url: hookUrl() } });
    await waitFor(async () => (received.length >= 1 ? true : undefined), 'the healthy delivery', 170_000);
    expect(JSON.parse(received[0].body)).toMatchObject({ job_id: data!.job_id, status: 'completed' });
    const rows = await silentRows(silentUrls);
    expect(rows).toHaveLength(silentUrls.length);
    expect(rows.filter((r) => r.status !== 'pending' || r.attempts !== 0)).toEqual([]); // all still waiting on their receivers
  }

  test('twenty deliveries to one silent host take only its few places', async () => {
    // Fewer delivery slots than silent deliveries: those over the host's cap must give their slot back.
    svc = await startTestService({ env: { ...env, WEBHOOK_CONCURRENCY: '10' } });
    const cap = svc.config.WEBHOOK_HOST_CONCURRENCY;
    const silent = await silentReceiver('127.0.0.2');
    try {
      const urls = Array.from({ length: 20 }, () => silent.url);
      await submitHooked(urls);
      await waitFor(
        async () => ((await silentRows([silent.url])).length === 20 && silent.open() >= cap ? true : undefined),
        'the silent host to hold its places',
        60_000,
      );
      await expectHealthyDeliveryFirst(urls);
      expect(silent.maxOpen()).toBe(cap); // the host never had more than its share in flight
    } finally {
      await silent.close();
    }
  }, 200_000);

  test('twenty silent receivers on twenty hosts, all holding a delivery', async () => {
    svc = await startTestService({ env });
    const silents = await Promise.all(Array.from({ length: 20 }, (_, i) => silentReceiver(`127.0.0.${i + 2}`)));
    try {
      const urls = silents.map((s) => s.url);
      await submitHooked(urls);
      await waitFor(async () => (silents.every((s) => s.open() === 1) ? true : undefined), 'every silent receiver to hold its delivery', 60_000);
      await expectHealthyDeliveryFirst(urls);
    } finally {
      await Promise.all(silents.map((s) => s.close()));
    }
  }, 200_000);
});

/** Resident memory of a process, and its peak since the last reset, in bytes (Linux /proc). */
function memoryOf(pid: number): { rss: number; peak: number } {
  const status = readFileSync(`/proc/${pid}/status`, 'utf8');
  const kb = (name: string) => Number(new RegExp(`^${name}:\\s+(\\d+) kB`, 'm').exec(status)![1]) * 1024;
  return { rss: kb('VmRSS'), peak: kb('VmHWM') };
}

test('a receiver answering 200 MB raises the memory of a real worker process by less than 50 MB', async () => {
  const TOTAL = 200 * 1024 * 1024;
  let sent = 0;
  const big = createServer((req, res) => {
    req.resume();
    req.on('end', () => {
      res.writeHead(200, { 'content-type': 'application/octet-stream', 'content-length': String(TOTAL) });
      const chunk = Buffer.alloc(64 * 1024, 0x61);
      const pump = () => {
        while (sent < TOTAL && !res.destroyed) {
          sent += chunk.length;
          if (!res.write(chunk)) return void res.once('drain', pump);
        }
        res.end();
      };
      pump();
    });
  });
  await new Promise<void>((r) => big.listen(0, '127.0.0.1', r));
  svc = await startTestService({ worker: false, env: allowLoopback });
  const mediaDir = mkdtempSync(path.join(tmpdir(), 'media-worker-'));
  const worker = spawn(process.execPath, ['--max-semi-space-size=2', fileURLToPath(new URL('../src/main-worker.ts', import.meta.url))], {
    cwd: mediaDir, // no .env here
    env: {
      PATH: process.env.PATH,
      DATABASE_URL: svc.databaseUrl,
      RUN_MIGRATIONS: 'false',
      LOG_LEVEL: 'silent',
      MEDIA_DIR: mediaDir,
      WEBHOOK_ALLOWED_CIDRS: '127.0.0.0/8',
      WORKER_POLL_INTERVAL_SECONDS: '0.5',
    },
    stdio: ['ignore', 'inherit', 'inherit'],
  });
  const exited = new Promise((resolve) => worker.on('exit', resolve));
  const s = svc;
  const delivered = (url: string) =>
    waitFor(
      async () =>
        (await s.db.selectFrom('webhook_deliveries').select('id').where('url', '=', url).where('status', '=', 'delivered').executeTakeFirst())
          ? true
          : undefined,
      `a delivery to ${url}`,
      30_000,
    );
  try {
    // Warm up: one job generated and its webhook delivered, so the code paths and pools exist.
    const { data } = await createMediaClient(s.baseUrl).POST('/generate', { body: { prompt: 'warm-up', webhook_url: hookUrl() } });
    await delivered(hookUrl());

    writeFileSync(`/proc/${worker.pid}/clear_refs`, '5'); // resets the peak (VmHWM) to the current RSS
    const before = memoryOf(worker.pid!);
    const bigUrl = `http://127.0.0.1:${(big.address() as AddressInfo).port}/hooks/big`;
    await s.db.transaction().execute(async (trx) => {
      const row = await trx.updateTable('jobs').set({ webhook_url: bigUrl }).where('id', '=', data!.job_id).returningAll().executeTakeFirstOrThrow();
      await enqueueWebhook(s.boss, trx, row, 'completed', s.config);
    });
    await delivered(bigUrl);
    const after = memoryOf(worker.pid!);

    expect(after.peak - before.rss).toBeLessThan(50 * 1024 * 1024);
    expect(sent).toBeLessThan(TOTAL); // the worker hung up instead of reading it all
  } finally {
    worker.kill('SIGTERM');
    await exited;
    big.closeAllConnections();
    await new Promise((r) => big.close(r));
    rmSync(mediaDir, { recursive: true, force: true });
  }
}, 120_000);
