// What a browser needs from the API: /docs "Try it out" calls the server it is served by (whatever the
// port), CORS lets the configured origins call it, and list filters take timestamps as people type them.
import { parse } from 'yaml';
import { startTestService, submit, type TestService } from './support/harness.ts';

const services: TestService[] = [];
afterEach(async () => {
  for (const s of services.splice(0)) await s.stop();
});
async function start(env: Record<string, string> = {}): Promise<TestService> {
  const svc = await startTestService({ worker: false, env });
  services.push(svc);
  return svc;
}

const preflight = (svc: TestService, origin: string, path = '/generate') =>
  fetch(`${svc.baseUrl}${path}`, {
    method: 'OPTIONS',
    headers: { origin, 'access-control-request-method': 'POST', 'access-control-request-headers': 'content-type, authorization, idempotency-key' },
  });

test('/docs "Try it out" targets the server serving it: the contract names a relative server', async () => {
  const svc = await start();
  const spec = parse(await (await fetch(`${svc.baseUrl}/openapi.yaml`)).text()) as { servers: { url: string }[] };
  expect(spec.servers.map((s) => s.url)).toEqual(['/']);
  // swagger-ui is initialised with the same document
  const init = await (await fetch(`${svc.baseUrl}/docs/swagger-ui-init.js`)).text();
  expect(init).toContain('"servers": [\n      {\n        "url": "/"');
  expect(init).not.toContain('localhost:8000');
});

describe('CORS', () => {
  test('by default, pages on this machine may call the API (a dev server on another port), others may not', async () => {
    const svc = await start();
    for (const origin of ['http://localhost:5173', 'http://127.0.0.1:3000', 'http://[::1]:8080']) {
      const res = await preflight(svc, origin);
      expect(res.status).toBe(204);
      expect(res.headers.get('access-control-allow-origin')).toBe(origin);
      expect(res.headers.get('access-control-allow-headers')?.toLowerCase()).toContain('authorization');
      expect(res.headers.get('access-control-allow-credentials')).toBeNull();
    }
    for (const origin of ['https://evil.example', 'http://localhost.evil.example', 'null']) {
      const res = await preflight(svc, origin);
      expect(res.headers.get('access-control-allow-origin')).toBeNull();
    }
  });

  test('an actual request from an allowed origin exposes Location and the request id', async () => {
    const svc = await start();
    const res = await submit(svc.baseUrl, { prompt: 'from a page' }, { origin: 'http://localhost:5173' });
    expect(res.status).toBe(202);
    expect(res.headers.get('access-control-allow-origin')).toBe('http://localhost:5173');
    expect(res.headers.get('access-control-expose-headers')).toMatch(/Location/);
    expect(res.headers.get('access-control-expose-headers')).toMatch(/X-Request-Id/);
    expect(res.headers.get('vary')).toMatch(/Origin/);
  });

  test('CORS_ORIGINS names the origins allowed instead', async () => {
    const svc = await start({ CORS_ORIGINS: 'https://app.example.com, https://admin.example.com' });
    expect((await preflight(svc, 'https://app.example.com')).headers.get('access-control-allow-origin')).toBe('https://app.example.com');
    expect((await preflight(svc, 'http://localhost:5173')).headers.get('access-control-allow-origin')).toBeNull();
  });

  test('CORS_ORIGINS=* allows any origin', async () => {
    const svc = await start({ CORS_ORIGINS: '*' });
    expect((await preflight(svc, 'https://anywhere.example')).headers.get('access-control-allow-origin')).toBe('*');
  });
});

test('list filters take an ISO timestamp unencoded, as typed (colons in the query)', async () => {
  const svc = await start();
  await submit(svc.baseUrl, { prompt: 'listed' });
  const res = await fetch(`${svc.baseUrl}/jobs?status=queued&created_after=2000-01-01T00:00:00Z&created_before=2999-01-01T00:00:00.000Z&limit=5`);
  expect(res.status).toBe(200);
  const body = (await res.json()) as { jobs: { prompt: string }[] };
  expect(body.jobs.map((j) => j.prompt)).toEqual(['listed']);
});
