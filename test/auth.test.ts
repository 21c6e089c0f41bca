// API keys and per-key isolation: anonymous requests are refused unless the server is bound to
// loopback; a key sees only what it created (another key's anything is a 404); operators see all.
import { spawnSync } from 'node:child_process';
import { createHmac, timingSafeEqual } from 'node:crypto';
import { createServer, type IncomingHttpHeaders, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { fileURLToPath } from 'node:url';
import { spec } from '../src/http/contract.ts';
import { withClient } from './support/postgres.ts';
import { openSse } from './support/sse.ts';
import { bearer, createApiKey, startTestService, submit, waitFor, waitForStatus, type TestService } from './support/harness.ts';

let svc: TestService;
let alice: string;
let bob: string;
let ops: string;

beforeAll(async () => {
  svc = await startTestService({ env: { ANONYMOUS_ACCESS: 'off', WEBHOOK_ALLOWED_CIDRS: '127.0.0.0/8', LOCAL_PROVIDER_LATENCY_MS: '0' } });
  [alice, bob, ops] = await Promise.all([
    createApiKey(svc.databaseUrl, { name: 'alice' }),
    createApiKey(svc.databaseUrl, { name: 'bob' }),
    createApiKey(svc.databaseUrl, { name: 'ops', operator: true }),
  ]);
});
afterAll(async () => {
  await svc?.stop();
});

const UNKNOWN = '00000000-0000-4000-8000-000000000000';

async function expectProblem(res: Response, status: number) {
  expect(res.status).toBe(status);
  expect(res.headers.get('content-type')).toMatch(/^application\/problem\+json/);
  const body = (await res.json()) as { status: number; title: string; type: string; detail?: string };
  expect(body).toMatchObject({ status, title: expect.any(String), type: expect.any(String) });
  return body;
}

async function submitAs(key: string, body: object, headers: Record<string, string> = {}): Promise<string> {
  const res = await submit(svc.baseUrl, body, { ...bearer(key), ...headers });
  expect(res.status).toBe(202);
  return ((await res.json()) as { job_id: string }).job_id;
}

describe('without a key (ANONYMOUS_ACCESS=off)', () => {
  const secured: [string, string][] = [
    ['POST', '/generate'],
    ['GET', `/status/${UNKNOWN}`],
    ['GET', '/jobs'],
    ['GET', `/jobs/${UNKNOWN}`],
    ['POST', `/jobs/${UNKNOWN}/cancel`],
    ['GET', `/jobs/${UNKNOWN}/events`],
    ['GET', '/webhooks/secret'],
    ['GET', '/metrics'],
    // express routes ignore case and a trailing slash: so must the authenticator
    ['POST', '/GENERATE'],
    ['POST', '/Generate/'],
    ['GET', '/JOBS'],
    ['GET', `/Status/${UNKNOWN}/`],
    ['GET', '/Webhooks/Secret'],
  ];

  test.each(secured)('%s %s is a 401 problem+json asking for a bearer key', async (method, path) => {
    const res = await fetch(`${svc.baseUrl}${path}`, {
      method,
      headers: { 'content-type': 'application/json' },
      body: method === 'POST' ? JSON.stringify({ prompt: 'anonymous' }) : undefined,
    });
    await expectProblem(res, 401);
    expect(res.headers.get('www-authenticate')).toMatch(/^Bearer /);
  });

  test('an anonymous submission leaves no job behind', async () => {
    await submit(svc.baseUrl, { prompt: 'never stored' });
    const { rows } = await withClient(svc.databaseUrl, (c) => c.query("select count(*)::int as n from jobs where prompt = 'never stored'"));
    expect(rows[0].n).toBe(0);
  });

  test.each(['/healthz', '/readyz', '/openapi.yaml', '/docs/'])('%s stays public', async (path) => {
    expect((await fetch(`${svc.baseUrl}${path}`)).status).toBe(200);
  });

  test.each([
    ['another scheme', 'Basic YWxpY2U6c2VjcmV0'],
    ['an empty bearer', 'Bearer '],
    ['two tokens', 'Bearer abc def'],
    ['a key nobody created', 'Bearer mgk_0000000000000000000000000000000000000000000'],
  ])('%s is a 401', async (_name, authorization) => {
    const res = await fetch(`${svc.baseUrl}/jobs`, { headers: { authorization } });
    await expectProblem(res, 401);
  });

  test('the contract declares the bearer scheme on every operation, public ones explicitly', () => {
    const doc = spec as unknown as {
      security?: unknown[];
      components: { securitySchemes: Record<string, { type: string; scheme: string }> };
      paths: Record<string, Record<string, { security?: unknown[] }>>;
    };
    expect(doc.components.securitySchemes.bearerAuth).toMatchObject({ type: 'http', scheme: 'bearer' });
    expect(doc.security).toEqual([{ bearerAuth: [] }]);
    const open = Object.entries(doc.paths).flatMap(([path, ops]) =>
      Object.entries(ops)
        .filter(([, op]) => op.security?.length === 0)
        .map(([m]) => `${m} ${path}`),
    );
    expect(open.sort()).toEqual(['get /docs', 'get /healthz', 'get /openapi.yaml', 'get /readyz']);
  });
});

describe('the keys CLI', () => {
  const cli = (...args: string[]) => {
    const run = spawnSync(process.execPath, [fileURLToPath(new URL('../scripts/keys.ts', import.meta.url)), ...args], {
      env: { PATH: process.env.PATH, DATABASE_URL: svc.databaseUrl },
      encoding: 'utf8',
    });
    return { status: run.status, stdout: run.stdout, stderr: run.stderr };
  };

  test('create prints the key once; list shows its prefix; revoke by that prefix refuses it', async () => {
    const created = cli('create', '--name', 'carol');
    expect(created.status).toBe(0);
    const carol = created.stdout.trim();
    expect(carol).toMatch(/^mgk_[A-Za-z0-9_-]{43}$/); // stdout holds the key alone, for scripts
    expect((await fetch(`${svc.baseUrl}/jobs`, { headers: bearer(carol) })).status).toBe(200);

    const listed = cli('list');
    expect(listed.status).toBe(0);
    const line = listed.stdout.split('\n').find((l) => l.includes('carol'))!;
    expect(line).toContain(carol.slice(0, 12));
    expect(listed.stdout).not.toContain(carol); // never the whole key again

    const revoked = cli('revoke', carol.slice(0, 12));
    expect(revoked.status).toBe(0);
    // Processes cache a key for a few seconds: wait for the refusal, not for a fixed time.
    const res = await waitFor(async () => {
      const r = await fetch(`${svc.baseUrl}/jobs`, { headers: bearer(carol) });
      return r.status === 401 ? r : undefined;
    }, 'the revoked key to be refused');
    await expectProblem(res, 401);
    expect(cli('list').stdout).toMatch(/carol.*REVOKED/);
  });

  test('bad usage fails without touching anything', () => {
    expect(cli('create').status).not.toBe(0); // no --name
    expect(cli('revoke', 'mgk_nobody').status).not.toBe(0);
    expect(cli('frobnicate').status).not.toBe(0);
  });

  test('only the hash of a key is stored', async () => {
    const { rows } = await withClient(svc.databaseUrl, (c) => c.query('select key_hash, prefix from api_keys where key_hash is not null'));
    const stored = JSON.stringify(rows);
    for (const key of [alice, bob, ops]) {
      expect(stored).not.toContain(key);
      expect(stored).not.toContain(key.slice(14)); // nothing of the secret part beyond the shown prefix
    }
  });
});

describe('isolation: another key gets 404 for everything of alice', () => {
  let jobId: string;
  let secondId: string;
  let resultUrl: string;

  beforeAll(async () => {
    jobId = await submitAs(alice, { prompt: 'alice private', parameters: { width: 64, height: 64 } }, { 'idempotency-key': 'alice-order-1' });
    const done = await waitForStatus(svc.baseUrl, jobId, ['completed'], 30_000, bearer(alice));
    resultUrl = done.result_url!;
    secondId = await submitAs(alice, { prompt: 'alice second', parameters: { width: 64, height: 64 } });
  });

  test('status and job', async () => {
    expect((await fetch(`${svc.baseUrl}/status/${jobId}`, { headers: bearer(alice) })).status).toBe(200);
    const forStatus = await expectProblem(await fetch(`${svc.baseUrl}/status/${jobId}`, { headers: bearer(bob) }), 404);
    const forUnknown = await expectProblem(await fetch(`${svc.baseUrl}/status/${UNKNOWN}`, { headers: bearer(bob) }), 404);
    // indistinguishable from an unknown id but for the id itself
    expect(forStatus.detail?.replace(jobId, 'ID')).toBe(forUnknown.detail?.replace(UNKNOWN, 'ID'));
    await expectProblem(await fetch(`${svc.baseUrl}/jobs/${jobId}`, { headers: bearer(bob) }), 404);
  });

  test('list', async () => {
    const mine = (await (await fetch(`${svc.baseUrl}/jobs?limit=100`, { headers: bearer(alice) })).json()) as { jobs: { job_id: string }[] };
    expect(mine.jobs.map((j) => j.job_id)).toEqual(expect.arrayContaining([jobId, secondId]));
    const theirs = (await (await fetch(`${svc.baseUrl}/jobs?limit=100`, { headers: bearer(bob) })).json()) as { jobs: { job_id: string }[] };
    expect(theirs.jobs.map((j) => j.job_id)).not.toContain(jobId);
    expect(theirs.jobs.map((j) => j.job_id)).not.toContain(secondId);
  });

  test('events', async () => {
    const res = await fetch(`${svc.baseUrl}/jobs/${jobId}/events`, { headers: bearer(bob) });
    await expectProblem(res, 404);
    const own = await openSse(`${svc.baseUrl}/jobs/${jobId}/events`, bearer(alice));
    expect(own.status).toBe(200);
    await own.ended;
    expect(own.events.at(-1)).toMatchObject({ data: { status: 'completed' } });
  });

  test('cancel: a 404, and the job is untouched', async () => {
    const victim = await submitAs(alice, { prompt: 'do not cancel me', parameters: { width: 64, height: 64 } });
    await expectProblem(await fetch(`${svc.baseUrl}/jobs/${victim}/cancel`, { method: 'POST', headers: bearer(bob) }), 404);
    const after = await waitForStatus(svc.baseUrl, victim, ['completed', 'failed', 'canceled'], 30_000, bearer(alice));
    expect(after.status).toBe('completed');
  });

  test('media: a request carrying another key is a 404; the owner, and holders of the URL, get it', async () => {
    expect(resultUrl).toMatch(/^\/media\//);
    await expectProblem(await fetch(`${svc.baseUrl}${resultUrl}`, { headers: bearer(bob) }), 404);
    expect((await fetch(`${svc.baseUrl}${resultUrl}`, { headers: bearer(alice) })).status).toBe(200);
    expect((await fetch(`${svc.baseUrl}${resultUrl}`)).status).toBe(200); // a capability URL (an <img> sends no key)
  });

  test('idempotency keys are per key: the same key name is a new job for bob, the same job for alice', async () => {
    const body = { prompt: 'bob reuses the name', parameters: { width: 64, height: 64 } };
    const res = await submit(svc.baseUrl, body, { ...bearer(bob), 'idempotency-key': 'alice-order-1' });
    expect(res.status).toBe(202); // not alice's 422 (a different body) nor alice's job
    const bobs = ((await res.json()) as { job_id: string }).job_id;
    expect(bobs).not.toBe(jobId);
    const again = await submit(
      svc.baseUrl,
      { prompt: 'alice private', parameters: { width: 64, height: 64 } },
      { ...bearer(alice), 'idempotency-key': 'alice-order-1' },
    );
    expect(again.status).toBe(200);
    expect(((await again.json()) as { job_id: string }).job_id).toBe(jobId);
  });

  test('webhook secret: each key has its own', async () => {
    const secretOf = async (key: string) => ((await (await fetch(`${svc.baseUrl}/webhooks/secret`, { headers: bearer(key) })).json()) as { key: string }).key;
    const [a1, b, a2, o] = await Promise.all([secretOf(alice), secretOf(bob), secretOf(alice), secretOf(ops)]);
    expect(a1).toMatch(/^whsec_[A-Za-z0-9+/]+={0,2}$/);
    expect(a1).toBe(a2);
    expect(new Set([a1, b, o]).size).toBe(3); // an operator too gets only its own
  });

  test("an operator sees and may cancel everyone's jobs", async () => {
    expect((await fetch(`${svc.baseUrl}/status/${jobId}`, { headers: bearer(ops) })).status).toBe(200);
    const all = (await (await fetch(`${svc.baseUrl}/jobs?limit=100`, { headers: bearer(ops) })).json()) as { jobs: { job_id: string }[] };
    expect(all.jobs.map((j) => j.job_id)).toContain(jobId);
    const res = await fetch(`${svc.baseUrl}/jobs/${jobId}/cancel`, { method: 'POST', headers: bearer(ops) });
    expect(res.status).toBe(409); // found (already completed), not hidden
    expect((await fetch(`${svc.baseUrl}/metrics`, { headers: bearer(ops) })).status).toBe(200);
    await expectProblem(await fetch(`${svc.baseUrl}/metrics`, { headers: bearer(alice) }), 403);
  });
});

describe("webhook deliveries are signed with the owner key's secret", () => {
  let receiver: Server;
  const received: { headers: IncomingHttpHeaders; body: string }[] = [];
  beforeAll(async () => {
    receiver = createServer((req, res) => {
      let body = '';
      req.on('data', (c) => (body += c));
      req.on('end', () => {
        received.push({ headers: req.headers, body });
        res.writeHead(204).end();
      });
    });
    await new Promise<void>((r) => receiver.listen(0, '127.0.0.1', r));
  });
  afterAll(async () => {
    await new Promise((r) => receiver.close(r));
  });

  // Standard Webhooks verification, written out here (not the service's signing code).
  const verifies = (secret: string, d: { headers: IncomingHttpHeaders; body: string }) => {
    const key = Buffer.from(secret.slice('whsec_'.length), 'base64');
    const expected = createHmac('sha256', key)
      .update(`${String(d.headers['webhook-id'])}.${String(d.headers['webhook-timestamp'])}.${d.body}`)
      .digest();
    return String(d.headers['webhook-signature'])
      .split(' ')
      .some((s) => {
        const given = Buffer.from(s.split(',')[1] ?? '', 'base64');
        return given.length === expected.length && timingSafeEqual(given, expected);
      });
  };

  test.each([['alice'], ['bob']])('%s', async (who) => {
    const key = who === 'alice' ? alice : bob;
    const other = who === 'alice' ? bob : alice;
    const url = `http://127.0.0.1:${(receiver.address() as AddressInfo).port}/${who}`;
    const id = await submitAs(key, { prompt: `hook for ${who}`, parameters: { width: 64, height: 64 }, webhook_url: url });
    const delivery = await waitFor(async () => received.find((r) => JSON.parse(r.body).job_id === id), `the delivery for ${who}`);
    const secretOf = async (k: string) => ((await (await fetch(`${svc.baseUrl}/webhooks/secret`, { headers: bearer(k) })).json()) as { key: string }).key;
    expect(verifies(await secretOf(key), delivery)).toBe(true);
    expect(verifies(await secretOf(other), delivery)).toBe(false);
  });
});

describe("priority above a key's maximum is refused", () => {
  test('an ordinary key: above KEY_MAX_PRIORITY (10) is a 400 naming /body/priority; at it, accepted', async () => {
    const res = await submit(svc.baseUrl, { prompt: 'urgent', priority: 11 }, bearer(alice));
    const body = (await expectProblem(res, 400)) as { errors?: { path: string }[] };
    expect(body.errors?.map((e) => e.path)).toContain('/body/priority');
    expect((await submit(svc.baseUrl, { prompt: 'urgent enough', priority: 10 }, bearer(alice))).status).toBe(202);
  });

  test('a key created with its own maximum, and an operator key (100)', async () => {
    const vip = await createApiKey(svc.databaseUrl, { name: 'vip', maxPriority: 50 });
    expect((await submit(svc.baseUrl, { prompt: 'vip', priority: 50 }, bearer(vip))).status).toBe(202);
    await expectProblem(await submit(svc.baseUrl, { prompt: 'vip', priority: 51 }, bearer(vip)), 400);
    expect((await submit(svc.baseUrl, { prompt: 'ops', priority: 100 }, bearer(ops))).status).toBe(202);
  });
});

describe('anonymous access depends on the bind address', () => {
  test('bound to loopback (the default), requests without a key run as the local principal, isolated from keys', async () => {
    const local = await startTestService({ databaseUrl: svc.databaseUrl, worker: false });
    try {
      const anonymous = await submit(local.baseUrl, { prompt: 'anonymous local job' });
      expect(anonymous.status).toBe(202);
      const anonId = ((await anonymous.json()) as { job_id: string }).job_id;
      expect((await fetch(`${local.baseUrl}/status/${anonId}`)).status).toBe(200);
      await expectProblem(await fetch(`${local.baseUrl}/status/${anonId}`, { headers: bearer(alice) }), 404);
      const aliceJob = await submitAs(alice, { prompt: 'alice, not anonymous' });
      await expectProblem(await fetch(`${local.baseUrl}/status/${aliceJob}`), 404);
      // a key that is sent must be valid: no silent fallback to anonymous
      await expectProblem(await fetch(`${local.baseUrl}/jobs`, { headers: { authorization: 'Bearer mgk_wrong' } }), 401);
    } finally {
      await local.stop();
    }
  });

  test('bound to every interface, a request without a key is a 401 even from loopback', async () => {
    const networked = await startTestService({ databaseUrl: svc.databaseUrl, worker: false, env: { HOST: '0.0.0.0' } });
    try {
      await expectProblem(await submit(networked.baseUrl, { prompt: 'from the network' }), 401);
      expect((await fetch(`${networked.baseUrl}/jobs`, { headers: bearer(alice) })).status).toBe(200);
    } finally {
      await networked.stop();
    }
  });
});
