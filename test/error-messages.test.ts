// What a client reads when it gets something wrong: clean field errors whichever form `parameters`
// takes, one problem `type` per kind of error, and 4xx details that say what to send instead.
import { startTestService, submit, type TestService } from './support/harness.ts';

let svc: TestService;
beforeAll(async () => {
  svc = await startTestService({ worker: false });
});
afterAll(async () => {
  await svc?.stop();
});

interface ProblemBody {
  type: string;
  title: string;
  status: number;
  detail?: string;
  errors?: { path: string; message: string }[];
}

async function problem(res: Response, status: number): Promise<ProblemBody> {
  expect(res.headers.get('content-type')).toMatch(/^application\/problem\+json/);
  const body = (await res.json()) as ProblemBody;
  expect(body.status).toBe(status);
  expect(res.status).toBe(status);
  return body;
}

const post = (body: string | undefined, headers: Record<string, string> = {}) => fetch(`${svc.baseUrl}/generate`, { method: 'POST', headers, body });

describe('parameters: the object form and the string form report the same errors', () => {
  test.each([
    ['a typo', { widht: 512 }, [{ path: '/body/parameters/widht', message: 'is not a known parameter' }]],
    [
      'two unknown keys',
      { widht: 512, hieght: 512 },
      [
        { path: '/body/parameters/widht', message: 'is not a known parameter' },
        { path: '/body/parameters/hieght', message: 'is not a known parameter' },
      ],
    ],
    ['a value out of range', { width: 10 }, [{ path: '/body/parameters/width', message: 'must be >= 64' }]],
    [
      'a wrong type',
      { output_format: 'gif' },
      [{ path: '/body/parameters/output_format', message: 'must be equal to one of the allowed values: png, webp, jpeg' }],
    ],
  ])('%s', async (_name, parameters, errors) => {
    const asObject = await problem(await submit(svc.baseUrl, { prompt: 'a cat', parameters }), 400);
    const asString = await problem(await submit(svc.baseUrl, { prompt: 'a cat', parameters: JSON.stringify(parameters) }), 400);
    expect(asObject.errors).toEqual(errors);
    expect(asString.errors).toEqual(errors);
    expect(asObject.type).toBe('urn:problem:validation_failed');
    expect(asString.type).toBe('urn:problem:validation_failed');
    expect(asObject.detail).not.toMatch(/oneOf|must match/);
  });

  test('parameters that are neither an object nor a string', async () => {
    const body = await problem(await submit(svc.baseUrl, { prompt: 'a cat', parameters: 42 }), 400);
    expect(body.errors).toEqual([{ path: '/body/parameters', message: 'must be an object, or a string holding the JSON of one' }]);
  });
});

test('every validation error has the same type, whichever layer found it', async () => {
  const types = new Set<string>();
  for (const res of [
    await submit(svc.baseUrl, { prompt: '' }), // the request validator
    await submit(svc.baseUrl, { prompt: 'a cat', parameters: '{"width": 1}' }), // the service
    await submit(svc.baseUrl, { prompt: 'a\u0000' }), // the prompt check
    await submit(svc.baseUrl, '{"prompt": '), // the JSON parser
    await fetch(`${svc.baseUrl}/jobs?limit=0`), // a query parameter
    await fetch(`${svc.baseUrl}/status/not-a-uuid`), // a path parameter
  ]) {
    types.add((await problem(res, 400)).type);
  }
  expect([...types]).toEqual(['urn:problem:validation_failed']);
});

test('not found has one type too: an unknown route, an unknown job, an unknown media file', async () => {
  const types = new Set<string>();
  for (const res of [await fetch(`${svc.baseUrl}/no-such-route`), await fetch(`${svc.baseUrl}/status/00000000-0000-4000-8000-000000000000`)]) {
    types.add((await problem(res, 404)).type);
  }
  expect([...types]).toEqual(['urn:problem:not_found']);
});

describe('an empty or missing body says what to send', () => {
  test.each([
    ['no body, no content type', undefined, {}],
    ['no body, JSON content type', undefined, { 'content-type': 'application/json' }],
    ['an empty JSON body', '', { 'content-type': 'application/json' }],
  ])('%s', async (_name, body, headers) => {
    const p = await problem(await post(body, headers), 400);
    expect(p.type).toBe('urn:problem:validation_failed');
    expect(p.detail).not.toMatch(/required property 'body'/);
    expect(p.detail).toMatch(/no body/);
    expect(p.detail).toContain('Content-Type: application/json');
    expect(p.detail).toContain('"prompt"');
    expect(p.errors).toEqual([{ path: '/body', message: expect.stringMatching(/^is missing/) }]);
  });

  test('a JSON body without a prompt names the field', async () => {
    const p = await problem(await post('{}', { 'content-type': 'application/json' }), 400);
    expect(p.errors).toEqual([{ path: '/body/prompt', message: "must have required property 'prompt'" }]);
  });
});

test('415 says which content type to send', async () => {
  const p = await problem(await post('prompt=a cat', { 'content-type': 'application/x-www-form-urlencoded' }), 415);
  expect(p.type).toBe('urn:problem:unsupported_media_type');
  expect(p.detail).toContain('application/x-www-form-urlencoded');
  expect(p.detail).toContain('Content-Type: application/json');
});

test('413 says what the limit is and what to send instead', async () => {
  const p = await problem(await submit(svc.baseUrl, JSON.stringify({ prompt: 'p', pad: 'x'.repeat(svc.config.MAX_BODY_BYTES) })), 413);
  expect(p.type).toBe('urn:problem:payload_too_large');
  expect(p.detail).toContain(`${svc.config.MAX_BODY_BYTES} bytes`);
  expect(p.detail).toMatch(/prompt .*2000 characters/);
});
