// Webhooks: signed like Replicate's, delivered for the chosen events, retried with backoff through the
// queue, and recorded.
import { createHmac, timingSafeEqual } from 'node:crypto';
import { createServer, type IncomingHttpHeaders, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { createMediaClient } from '../src/client/index.ts';
import { signWebhook } from '../src/webhooks/webhook.service.ts';
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

const hookUrl = () => `http://127.0.0.1:${(receiver.address() as AddressInfo).port}/hooks/media`;

test('start and completed deliveries, signed so that a receiver can verify them', async () => {
  svc = await startTestService();
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
  svc = await startTestService({ env: { WEBHOOK_SECRET: secret } });
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
  svc = await startTestService();
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
