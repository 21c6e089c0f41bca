// The HTTP contract: the original request and response shapes, the served image, and every kind of
// bad input answered with problem+json naming the problem.
import { writeFileSync } from 'node:fs';
import path from 'node:path';
import sharp from 'sharp';
import { probeImage } from '../src/media/normalize.ts';
import { startTestService, submit, waitForStatus, type TestService } from './support/harness.ts';
import { mediaPath, tokenOf } from './support/media-names.ts';

let svc: TestService;
beforeAll(async () => {
  svc = await startTestService();
});
afterAll(async () => {
  await svc?.stop();
});

const ORIGINAL_BODY = '{"prompt": "A futuristic city at sunset", "parameters": "{\\"width\\":512,\\"height\\":512}"}';
const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/;

async function expectProblem(res: Response, status: number, pathOrText?: string) {
  expect(res.status).toBe(status);
  expect(res.headers.get('content-type')).toMatch(/^application\/problem\+json/);
  const body = (await res.json()) as { type: string; title: string; status: number; detail?: string; errors?: { path: string; message: string }[] };
  expect(body).toMatchObject({ status, type: expect.any(String), title: expect.any(String) });
  if (pathOrText) {
    const named = (body.errors ?? []).some((e) => e.path.includes(pathOrText)) || (body.detail ?? '').includes(pathOrText);
    if (!named) throw new Error(`problem does not name ${pathOrText}: ${JSON.stringify(body)}`);
  }
  return body;
}

describe('POST /generate', () => {
  test('accepts the original body byte for byte and answers 202 {job_id, status}', async () => {
    const res = await submit(svc.baseUrl, ORIGINAL_BODY);
    expect(res.status).toBe(202);
    const text = await res.text();
    const { job_id } = JSON.parse(text);
    expect(job_id).toMatch(UUID);
    expect(text).toBe(`{"job_id":"${job_id}","status":"queued"}`);
    expect(res.headers.get('location')).toBe(`/status/${job_id}`);
    expect(res.headers.get('content-type')).toMatch(/^application\/json/);
  });

  test('accepts parameters as an object, and absent', async () => {
    const a = await submit(svc.baseUrl, { prompt: 'object form', parameters: { width: 256, height: 128, output_format: 'webp', seed: 7 } });
    expect(a.status).toBe(202);
    const b = await submit(svc.baseUrl, { prompt: 'no parameters' });
    expect(b.status).toBe(202);
    const status = await waitForStatus(svc.baseUrl, ((await b.json()) as { job_id: string }).job_id);
    expect(status.parameters).toEqual({ width: 512, height: 512, output_format: 'png', num_outputs: 1 });
  });

  test.each([
    ['an unknown parameter key', { prompt: 'p', parameters: { width: 512, steps: 20 } }, 400, '/body/parameters/steps'],
    ['an unknown key inside the JSON string', { prompt: 'p', parameters: '{"width":512,"colour":"red"}' }, 400, '/body/parameters/colour'],
    ['a parameters string that is not JSON', { prompt: 'p', parameters: '{width: 512' }, 400, '/body/parameters'],
    ['a parameters string encoding an array', { prompt: 'p', parameters: '[1,2]' }, 400, '/body/parameters'],
    ['a width too small (string form)', { prompt: 'p', parameters: '{"width":10}' }, 400, '/body/parameters/width'],
    ['a height too large (object form)', { prompt: 'p', parameters: { height: 4096 } }, 400, '/body/parameters'],
    ['a non-integer width', { prompt: 'p', parameters: { width: 512.5 } }, 400, '/body/parameters'],
    ['an unknown output format', { prompt: 'p', parameters: '{"output_format":"gif"}' }, 400, '/body/parameters/output_format'],
    ['too many outputs', { prompt: 'p', parameters: '{"num_outputs":5}' }, 400, '/body/parameters/num_outputs'],
    ['a negative seed', { prompt: 'p', parameters: '{"seed":-1}' }, 400, '/body/parameters/seed'],
    ['a blank prompt', { prompt: '   \n\t ' }, 400, '/body/prompt'],
    ['an empty prompt', { prompt: '' }, 400, '/body/prompt'],
    ['a prompt of zero-width characters only', { prompt: '\u200b\u200d\ufeff' }, 400, '/body/prompt'],
    ['a prompt with a NUL character', { prompt: 'a\u0000b' }, 400, '/body/prompt'],
    ['a prompt with an unpaired surrogate', { prompt: 'a\ud800b' }, 400, '/body/prompt'],
    ['an over-long prompt', { prompt: 'x'.repeat(2001) }, 400, '/body/prompt'],
    ['a missing prompt', { parameters: {} }, 400, 'prompt'],
    ['a prompt of the wrong type', { prompt: 42 }, 400, '/body/prompt'],
    ['an unknown top-level field', { prompt: 'p', negative_prompt: 'x' }, 400, 'negative_prompt'],
    ['a body that is an array', [{ prompt: 'p' }], 400, '/body'],
  ])('rejects %s with 400 problem+json naming it', async (_name, body, status, path) => {
    await expectProblem(await submit(svc.baseUrl, body), status, path);
  });

  test('rejects a body that is not valid JSON', async () => {
    await expectProblem(await submit(svc.baseUrl, '{"prompt": "unterminated'), 400, '/body');
  });

  test('rejects a body that is not JSON at all with 415', async () => {
    const res = await fetch(`${svc.baseUrl}/generate`, { method: 'POST', headers: { 'content-type': 'text/plain' }, body: 'prompt=hello' });
    await expectProblem(res, 415);
  });

  test('rejects an oversized body with 413', async () => {
    await expectProblem(await submit(svc.baseUrl, JSON.stringify({ prompt: 'p', pad: 'x'.repeat(svc.config.MAX_BODY_BYTES) })), 413);
  });
});

describe('GET /status/{job_id}', () => {
  test('a completed job has the original shape first: job_id, status, result_url', async () => {
    const { job_id } = (await (await submit(svc.baseUrl, ORIGINAL_BODY)).json()) as { job_id: string };
    await waitForStatus(svc.baseUrl, job_id, ['completed']);
    const text = await (await fetch(`${svc.baseUrl}/status/${job_id}`)).text();
    expect(text).toMatch(new RegExp(`^\\{"job_id":"${job_id}","status":"completed","result_url":"/media/${job_id}-1-[0-9a-f]{32}\\.png"`));
    const body = JSON.parse(text);
    expect(body).toMatchObject({
      attempts: 1,
      provider: 'local',
      outputs: [{ url: expect.stringMatching(mediaPath(job_id, 1, 'png')), width: 512, height: 512, format: 'png' }],
    });
    expect(Date.parse(body.created_at)).toBeLessThanOrEqual(Date.parse(body.finished_at));
    expect(body).not.toHaveProperty('error');
  });

  test('unknown id is 404, malformed id is 400, both problem+json', async () => {
    await expectProblem(await fetch(`${svc.baseUrl}/status/00000000-0000-4000-8000-000000000000`), 404);
    await expectProblem(await fetch(`${svc.baseUrl}/status/not-a-uuid`), 400, 'job_id');
  });
});

describe('a job end to end', () => {
  test.each([
    ['png', 512, 512, 'image/png'],
    ['webp', 300, 200, 'image/webp'],
    ['jpeg', 64, 2048, 'image/jpeg'],
  ])('serves a %s of the requested size', async (format, width, height, contentType) => {
    const res = await submit(svc.baseUrl, { prompt: `a ${format} picture`, parameters: JSON.stringify({ width, height, output_format: format }) });
    const { job_id } = (await res.json()) as { job_id: string };
    const status = await waitForStatus(svc.baseUrl, job_id, ['completed']);
    expect(status.result_url).toMatch(mediaPath(job_id, 1, format));
    const image = await fetch(`${svc.baseUrl}${status.result_url}`);
    expect(image.status).toBe(200);
    expect(image.headers.get('content-type')).toBe(contentType);
    expect(image.headers.get('cache-control')).toMatch(/max-age=\d+.*immutable/);
    const bytes = Buffer.from(await image.arrayBuffer());
    expect(await probeImage(bytes)).toEqual({ width, height, format: format === 'jpeg' ? 'jpeg' : format });
    expect(status.outputs[0].bytes).toBe(bytes.length);
  });

  test('num_outputs gives several images; result_url stays the first', async () => {
    const res = await submit(svc.baseUrl, { prompt: 'four of them', parameters: { num_outputs: 3, width: 128, height: 128 } });
    const { job_id } = (await res.json()) as { job_id: string };
    const status = await waitForStatus(svc.baseUrl, job_id, ['completed']);
    const urls = status.outputs.map((o) => o.url);
    [0, 1, 2].forEach((i) => expect(urls[i]).toMatch(mediaPath(job_id, 1, 'png', i)));
    expect(new Set(urls.map(tokenOf)).size).toBe(1); // one attempt wrote them all
    expect(status.result_url).toBe(status.outputs[0].url);
    const served = await Promise.all(status.outputs.map(async (o) => Buffer.from(await (await fetch(`${svc.baseUrl}${o.url}`)).arrayBuffer())));
    expect(new Set(served.map((b) => b.toString('base64'))).size).toBe(3); // three different pictures
  });

  test('the same prompt and seed give the same pixels', async () => {
    const body = { prompt: 'deterministic', parameters: { seed: 1234, width: 96, height: 96 } };
    const ids = await Promise.all(
      [submit(svc.baseUrl, body), submit(svc.baseUrl, body)].map(async (p) => ((await (await p).json()) as { job_id: string }).job_id),
    );
    const images = await Promise.all(
      ids.map(async (id) => {
        const s = await waitForStatus(svc.baseUrl, id, ['completed']);
        return Buffer.from(await (await fetch(`${svc.baseUrl}${s.result_url}`)).arrayBuffer());
      }),
    );
    expect(images[0].equals(images[1])).toBe(true);
  });
});

describe('GET /media/{file}', () => {
  test.each([
    ['/media/..%2Fpackage.json', 400],
    ['/media/%2e%2e%2f%2e%2e%2fetc%2fpasswd', 400],
    ['/media/.tmp-abc.png', 400],
    ['/media/00000000-0000-4000-8000-000000000000.gif', 400],
    ['/media/00000000-0000-4000-8000-000000000000-1-abc.png', 400],
  ])('refuses %s', async (path, status) => {
    await expectProblem(await fetch(`${svc.baseUrl}${path}`), status, 'file');
  });

  test('an absent file is 404', async () => {
    await expectProblem(await fetch(`${svc.baseUrl}/media/00000000-0000-4000-8000-000000000000-1-${'0'.repeat(32)}.png`), 404);
    await expectProblem(await fetch(`${svc.baseUrl}/media/00000000-0000-4000-8000-000000000000.png`), 404);
  });

  test('outputs written by earlier versions (named <job_id>[-n].<ext>) are still served', async () => {
    const png = await sharp({ create: { width: 8, height: 8, channels: 3, background: '#808080' } })
      .png()
      .toBuffer();
    const id = '11111111-1111-4111-8111-111111111111';
    for (const name of [`${id}.png`, `${id}-1.png`, `${id}.thumb.webp`]) {
      writeFileSync(path.join(svc.config.MEDIA_DIR, name), png);
      const res = await fetch(`${svc.baseUrl}/media/${name}`);
      expect(res.status).toBe(200);
      expect(Buffer.from(await res.arrayBuffer()).equals(png)).toBe(true);
    }
  });
});

describe('operations', () => {
  test('healthz and readyz answer ok', async () => {
    expect(await (await fetch(`${svc.baseUrl}/healthz`)).json()).toEqual({ status: 'ok' });
    expect(await (await fetch(`${svc.baseUrl}/readyz`)).json()).toEqual({ status: 'ok' });
  });

  test('serves the contract and offline docs', async () => {
    const spec = await fetch(`${svc.baseUrl}/openapi.yaml`);
    expect(spec.headers.get('content-type')).toMatch(/yaml/);
    expect(await spec.text()).toMatch(/^openapi: 3\.1\.0/);
    const docs = await fetch(`${svc.baseUrl}/docs/`);
    expect(docs.status).toBe(200);
    const html = await docs.text();
    expect(html).toMatch(/swagger-ui/i);
    expect(html).not.toMatch(/https?:\/\/(cdn|unpkg)/); // works offline: assets served by us
    const asset = html.match(/src="\.\/([^"]+\.js)"/)?.[1];
    expect(asset).toBeDefined();
    expect((await fetch(`${svc.baseUrl}/docs/${asset}`)).status).toBe(200);
  });

  test('unknown routes and methods are problem+json', async () => {
    await expectProblem(await fetch(`${svc.baseUrl}/nope`), 404);
    await expectProblem(await fetch(`${svc.baseUrl}/generate`), 405);
  });

  test('echoes a request id', async () => {
    const res = await fetch(`${svc.baseUrl}/healthz`, { headers: { 'x-request-id': 'abc-123' } });
    expect(res.headers.get('x-request-id')).toBe('abc-123');
  });
});
