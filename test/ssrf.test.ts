// Webhooks cannot be aimed inward: every spelling of a loopback, private, link-local… address is refused
// at submit (422 naming the field), and the address a delivery actually connects to is checked again,
// so a name that resolves to a public address at submit and to 127.0.0.1 later (DNS rebinding) still
// reaches nothing. The receiver here listens on 127.0.0.1; nothing is allowed unless a test says so.
import type { LookupAddress } from 'node:dns';
import { createServer, type Server } from 'node:http';
import type { AddressInfo, LookupFunction } from 'node:net';
import { createLogger } from '../src/logger.ts';
import { checkOutboundUrl, forbiddenRange, parseCidr } from '../src/net/outbound.ts';
import { checkWebhookUrl, createWebhookDelivery, enqueueWebhook } from '../src/webhooks/webhook.service.ts';
import { startTestService, submit, waitFor, waitForStatus, type TestService } from './support/harness.ts';

let receiver: Server;
let received: string[];
let svc: TestService | undefined;

beforeEach(async () => {
  received = [];
  receiver = createServer((req, res) => {
    received.push(`${req.method} ${req.url}`);
    res.writeHead(200).end();
  });
  await new Promise<void>((r) => receiver.listen(0, '127.0.0.1', r));
});
afterEach(async () => {
  await svc?.stop();
  svc = undefined;
  await new Promise((r) => receiver.close(r));
});

const port = () => (receiver.address() as AddressInfo).port;

// Each of these reaches this machine, its network or the cloud's metadata service.
const spellings = (p: number) => [
  `http://127.0.0.1:${p}/hook`,
  `http://0.0.0.0:${p}/hook`,
  `http://2130706433:${p}/hook`, // 127.0.0.1 as one number
  `http://0x7f000001:${p}/hook`, // … in hex
  `http://127.1:${p}/hook`, // … shortened
  `http://[::ffff:127.0.0.1]:${p}/hook`, // IPv4-mapped IPv6
  `http://localhost:${p}/hook`, // a name that resolves to loopback
  `http://[::1]:${p}/hook`,
  `http://[::]:${p}/hook`,
  `http://user:pass@127.0.0.1:${p}/hook`, // credentials (forwarded as Basic auth)
  `https://user:pass@hooks.example.com/hook`, // credentials, even to a public host
  'http://10.1.2.3/hook', // private
  'http://172.16.0.1/hook',
  'http://192.168.1.1/hook',
  'http://100.64.0.1/hook', // carrier-grade NAT
  'http://169.254.169.254/latest/meta-data/', // link-local: cloud metadata
  'http://224.0.0.1/hook', // multicast
  'http://[fe80::1]/hook', // IPv6 link-local
  'http://[fd00::1]/hook', // IPv6 unique local
  'http://[::ffff:10.0.0.1]/hook', // IPv4-mapped private
  'http://[::ffff:169.254.169.254]/hook',
];

test('every spelling of an inward webhook_url is a 422 naming the field, and no job is created', async () => {
  svc = await startTestService();
  for (const url of spellings(port())) {
    const res = await submit(svc.baseUrl, { prompt: 'inward', webhook_url: url });
    const body = (await res.json()) as { status: number; errors?: { path: string; message: string }[] };
    if (res.status !== 422) throw new Error(`${url} was answered ${res.status}: ${JSON.stringify(body)}`);
    expect(res.headers.get('content-type')).toMatch(/^application\/problem\+json/);
    expect(body.errors?.map((e) => e.path)).toEqual(['/body/webhook_url']);
  }
  const list = (await (await fetch(`${svc.baseUrl}/jobs`)).json()) as { jobs: unknown[] };
  expect(list.jobs).toEqual([]);
});

test('a public address is accepted; the allow-list admits only what it names', async () => {
  svc = await startTestService({ worker: false, env: { WEBHOOK_ALLOWED_CIDRS: '127.0.0.1' } });
  expect((await submit(svc.baseUrl, { prompt: 'public', webhook_url: 'https://93.184.215.14/hooks?token=x' })).status).toBe(202);
  expect((await submit(svc.baseUrl, { prompt: 'allowed', webhook_url: `http://127.0.0.1:${port()}/hook` })).status).toBe(202);
  expect((await submit(svc.baseUrl, { prompt: 'next door', webhook_url: `http://127.0.0.2:${port()}/hook` })).status).toBe(422);
  expect((await submit(svc.baseUrl, { prompt: 'credentials', webhook_url: `http://a:b@127.0.0.1:${port()}/hook` })).status).toBe(422);
});

test('a delivery to an inward address is refused where it connects: failed for good, nothing received', async () => {
  // A row from before the check (or a URL whose name changed since): the worker must not call it.
  svc = await startTestService();
  const res = await submit(svc.baseUrl, { prompt: 'old row' });
  const { job_id } = (await res.json()) as { job_id: string };
  await waitForStatus(svc.baseUrl, job_id, ['completed']);
  const s = svc;
  for (const url of [`http://127.0.0.1:${port()}/hook`, `http://localhost:${port()}/hook`, `http://[::ffff:127.0.0.1]:${port()}/hook`]) {
    await s.db.transaction().execute(async (trx) => {
      const row = await trx.updateTable('jobs').set({ webhook_url: url }).where('id', '=', job_id).returningAll().executeTakeFirstOrThrow();
      await enqueueWebhook(s.boss, trx, row, 'completed', s.config);
    });
  }
  const rows = await waitFor(async () => {
    const all = await s.db.selectFrom('webhook_deliveries').select(['status', 'attempts', 'last_error', 'url']).where('job_id', '=', job_id).execute();
    return all.length === 3 && all.every((r) => r.status === 'failed') ? all : undefined;
  }, 'the three deliveries to be refused');
  for (const row of rows) {
    expect(row.attempts).toBe(1); // refused once, not retried
    expect(row.last_error).toMatch(/^refused: .*(loopback|ipv4Mapped)/);
  }
  expect(received).toEqual([]);
});

/** A resolver we control: the first answer is public, every later one is this machine. */
function rebindingResolver(): { lookup: LookupFunction; calls: string[] } {
  const calls: string[] = [];
  const lookup: LookupFunction = (hostname, options, callback) => {
    calls.push(hostname);
    const address = calls.length === 1 ? '93.184.215.14' : '127.0.0.1';
    if (options.all) (callback as unknown as (err: null, a: LookupAddress[]) => void)(null, [{ address, family: 4 }]);
    else callback(null, address, 4);
  };
  return { lookup, calls };
}

describe('DNS rebinding', () => {
  // The network guard allows loopback by host name; this name is resolved only by the resolver below.
  const allowedBefore = process.env.TEST_ALLOWED_HOSTS;
  beforeAll(() => {
    process.env.TEST_ALLOWED_HOSTS = [allowedBefore, 'hooks.rebind.test'].filter(Boolean).join(',');
  });
  afterAll(() => {
    if (allowedBefore === undefined) delete process.env.TEST_ALLOWED_HOSTS;
    else process.env.TEST_ALLOWED_HOSTS = allowedBefore;
  });

  async function pendingDelivery(s: TestService, url: string): Promise<string> {
    const res = await submit(s.baseUrl, { prompt: 'rebinding' });
    const { job_id } = (await res.json()) as { job_id: string };
    return s.db.transaction().execute(async (trx) => {
      const row = await trx.updateTable('jobs').set({ webhook_url: url }).where('id', '=', job_id).returningAll().executeTakeFirstOrThrow();
      await enqueueWebhook(s.boss, trx, row, 'completed', s.config);
      const d = await trx.selectFrom('webhook_deliveries').select('id').where('job_id', '=', job_id).executeTakeFirstOrThrow();
      return d.id;
    });
  }

  test('a name that was public at submit and is 127.0.0.1 at delivery reaches nothing', async () => {
    svc = await startTestService({ worker: false });
    const url = `http://hooks.rebind.test:${port()}/hook`;
    const { lookup, calls } = rebindingResolver();
    await expect(checkWebhookUrl(url, svc.config, lookup)).resolves.toBeUndefined(); // accepted: public then
    const deliveryId = await pendingDelivery(svc, url);

    const deps = { db: svc.db, boss: svc.boss, config: svc.config, logger: createLogger('silent'), lookup };
    expect(await createWebhookDelivery(deps)(deliveryId, false)).toBe('refused');
    expect(calls).toEqual(['hooks.rebind.test', 'hooks.rebind.test']); // resolved again, as it connected
    expect(received).toEqual([]);
    const row = await svc.db.selectFrom('webhook_deliveries').selectAll().where('id', '=', deliveryId).executeTakeFirstOrThrow();
    expect(row).toMatchObject({ status: 'failed', attempts: 1 });
    expect(row.last_error).toMatch(/hooks\.rebind\.test resolves to 127\.0\.0\.1, a loopback address/);
  });

  test('control: with 127.0.0.1 allowed, the same resolver does reach the receiver', async () => {
    // Shows the resolver above is the one the delivery connects with (so its refusal is the check's doing).
    svc = await startTestService({ worker: false, env: { WEBHOOK_ALLOWED_CIDRS: '127.0.0.1' } });
    const url = `http://hooks.rebind.test:${port()}/hook`;
    const { lookup } = rebindingResolver();
    await checkWebhookUrl(url, svc.config, lookup);
    const deliveryId = await pendingDelivery(svc, url);
    const deps = { db: svc.db, boss: svc.boss, config: svc.config, logger: createLogger('silent'), lookup };
    expect(await createWebhookDelivery(deps)(deliveryId, false)).toBe('delivered');
    expect(received).toEqual(['POST /hook']);
  });

  test('at submit, a name resolving to loopback is refused through the same resolver', async () => {
    const { lookup } = rebindingResolver();
    lookup('warm-up', { all: true }, () => {}); // spend the public answer
    await expect(checkOutboundUrl('http://hooks.rebind.test/hook', { lookup })).resolves.toMatch(
      /loopback address \(hooks\.rebind\.test resolves to 127\.0\.0\.1\)/,
    );
  });
});

describe('the address classifier', () => {
  test('only global unicast passes', () => {
    expect(forbiddenRange('93.184.215.14')).toBeUndefined();
    expect(forbiddenRange('2606:2800:21f:cb07:6820:80da:af6b:8b2c')).toBeUndefined();
    for (const a of [
      '127.0.0.1',
      '0.0.0.0',
      '10.0.0.1',
      '100.100.100.100',
      '169.254.169.254',
      '224.0.0.251',
      '255.255.255.255',
      '::1',
      '::',
      'fe80::1',
      'fd12::1',
      '::ffff:127.0.0.1',
      '::ffff:8.8.8.8',
    ]) {
      expect([a, forbiddenRange(a)]).toEqual([a, expect.any(String)]);
    }
  });

  test('the allow-list matches by range and by family, nothing more', () => {
    const allowed = ['127.0.0.0/8', '::1/128'].map(parseCidr);
    expect(forbiddenRange('127.0.0.2', allowed)).toBeUndefined();
    expect(forbiddenRange('::1', allowed)).toBeUndefined();
    expect(forbiddenRange('::ffff:127.0.0.1', allowed)).toBe('ipv4Mapped');
    expect(forbiddenRange('10.0.0.1', allowed)).toBe('private');
  });

  test('allow-list entries are plain addresses or ranges', () => {
    expect(parseCidr(' 10.0.0.0/8 ')).toBe('10.0.0.0/8');
    expect(parseCidr('::1')).toBe('::1/128');
    for (const bad of ['127.1', '0x7f000001', '10.0.0.0/33', 'localhost', '10.0.0.0/8/1', '']) expect(() => parseCidr(bad)).toThrow();
  });
});
