// The page at `/`, in a real Chromium: submit a prompt and watch it complete, open the image, cancel a
// slow job, see a failed job's error, watch a queue position move, use an API key. Every check of what
// the page shows is compared with what the API itself says.
import { mkdirSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import type { Browser, BrowserContext, Page } from 'playwright-core';
import { createLocalProvider } from '../src/providers/local.provider.ts';
import { ProviderError, type ImageProvider } from '../src/providers/provider.ts';
import { launchChromium } from './support/browser.ts';
import { createApiKey, startTestService, submit, waitFor, waitForStatus, type StatusBody, type TestService } from './support/harness.ts';

const artifacts = fileURLToPath(new URL('../test-results/', import.meta.url));
let browser: Browser;
let context: BrowserContext;
let page: Page;
const services: TestService[] = [];
const pageErrors: string[] = [];

beforeAll(async () => {
  browser = await launchChromium();
}, 120_000);
afterAll(async () => {
  await browser?.close();
});
beforeEach(async () => {
  context = await browser.newContext({ viewport: { width: 1200, height: 900 } });
  page = await context.newPage();
  page.on('pageerror', (err) => pageErrors.push(String(err)));
  page.on('console', (msg) => {
    if (msg.type() === 'error') pageErrors.push(msg.text());
  });
});
afterEach(async () => {
  await context.close();
  for (const s of services.splice(0)) await s.stop();
  const errors = pageErrors.splice(0);
  expect(errors).toEqual([]); // no script error, no failed request the page did not expect
});

/**
 * Waits until an expression is true in the page. Not page.waitForFunction: with a string it compiles it
 * in the page (eval), which the page's Content-Security-Policy rightly refuses; evaluate() does not.
 */
async function untilTrue(page: Page, expression: string): Promise<void> {
  await waitFor(async () => ((await page.evaluate(expression)) === true ? true : undefined), expression);
}

async function start(options: Parameters<typeof startTestService>[0] = {}): Promise<TestService> {
  const svc = await startTestService(options);
  services.push(svc);
  return svc;
}

const job = (id: string) => page.locator(`#jobs li[data-job-id="${id}"]`);
const WAIT = { timeout: 45_000 };

async function apiJob(svc: TestService, id: string, headers: Record<string, string> = {}): Promise<StatusBody> {
  return (await (await fetch(`${svc.baseUrl}/jobs/${id}`, { headers })).json()) as StatusBody;
}

/** Fills the form as a person would (by the labels) and submits; returns the new job's id. */
async function generate(prompt: string, options: { size?: string; format?: string; seed?: string; images?: string } = {}): Promise<string> {
  await page.getByLabel('Prompt').fill(prompt);
  if (options.size) await page.getByLabel('Size').selectOption(options.size);
  if (options.format) await page.getByLabel('Format').selectOption(options.format);
  if (options.seed) await page.getByLabel('Seed').fill(options.seed);
  if (options.images) await page.getByLabel('Images').fill(options.images);
  const before = await page.locator('#jobs li').count();
  await page.getByRole('button', { name: 'Generate' }).click();
  await page.locator('#jobs li').nth(before).waitFor(WAIT);
  return (await page.locator('#jobs li').first().getAttribute('data-job-id'))!;
}

test('submit a prompt, watch it run and complete, open the image full size and download it', async () => {
  const svc = await start({ env: { LOCAL_PROVIDER_LATENCY_MS: '2500' } });
  await page.goto(svc.baseUrl);
  await expect(page.title()).resolves.toBe('Media generation');
  const id = await generate('A lighthouse in a storm', { size: '256x256', format: 'webp', seed: '7', images: '2' });

  // live: processing with progress (from the event stream), then completed
  await job(id).and(page.locator('[data-status="processing"]')).waitFor(WAIT);
  await job(id).locator('progress').waitFor(WAIT);
  await job(id).and(page.locator('[data-status="completed"]')).waitFor(WAIT);
  const done = await apiJob(svc, id);
  expect(done).toMatchObject({ status: 'completed', attempts: 1, parameters: { width: 256, height: 256, output_format: 'webp', num_outputs: 2, seed: 7 } });
  await expect(job(id).locator('.job-facts').textContent()).resolves.toBe('256×256 webp · 2 images · seed 7 · attempt 1');

  // the gallery shows both outputs by their thumbnails
  const thumbs = page.locator(`#gallery button[data-job-id="${id}"] img`);
  await expect(thumbs.count()).resolves.toBe(2);
  expect(await thumbs.evaluateAll((imgs) => imgs.map((i) => i.getAttribute('src')))).toEqual(
    done.outputs.map((o) => (o as { thumbnail_url: string }).thumbnail_url),
  );
  await untilTrue(page, `[...document.querySelectorAll('#gallery button[data-job-id="${id}"] img')].every((i) => i.complete && i.naturalWidth > 0)`);

  // full size in a dialog, with a download link to the image itself; Escape closes it (keyboard)
  await page.locator(`#gallery button[data-job-id="${id}"]`).first().click();
  const viewer = page.getByRole('dialog');
  await viewer.waitFor();
  await untilTrue(page, `document.getElementById('viewer-image').naturalWidth > 0`);
  expect(await page.evaluate(`[document.getElementById('viewer-image').naturalWidth, document.getElementById('viewer-image').naturalHeight]`)).toEqual([
    256, 256,
  ]);
  const download = page.getByRole('link', { name: 'Download' });
  expect(await download.getAttribute('href')).toBe(done.outputs[0].url);
  const [file] = await Promise.all([page.waitForEvent('download'), download.click()]);
  expect(file.suggestedFilename()).toBe(done.outputs[0].url.split('/').pop());
  await page.keyboard.press('Escape');
  await viewer.waitFor({ state: 'hidden' });

  mkdirSync(artifacts, { recursive: true });
  await page.screenshot({ path: `${artifacts}page.png`, fullPage: true });
});

test('cancel a slow job, then run it again', async () => {
  const svc = await start({ env: { LOCAL_PROVIDER_LATENCY_MS: '600000' } });
  await page.goto(svc.baseUrl);
  const id = await generate('A very slow painting');
  await job(id).and(page.locator('[data-status="processing"]')).waitFor(WAIT);
  await job(id).getByRole('button', { name: 'Cancel' }).click();
  await job(id).and(page.locator('[data-status="canceled"]')).waitFor(WAIT);
  expect((await apiJob(svc, id)).status).toBe('canceled');
  await expect(job(id).getByRole('button', { name: 'Cancel' }).count()).resolves.toBe(0);

  await job(id).getByRole('button', { name: 'Run again' }).click();
  await page.locator('#jobs li').nth(1).waitFor(WAIT);
  const again = (await page.locator('#jobs li').first().getAttribute('data-job-id'))!;
  expect(again).not.toBe(id);
  const rerun = await apiJob(svc, again);
  expect(rerun).toMatchObject({ prompt: 'A very slow painting', parameters: (await apiJob(svc, id)).parameters });
  await job(again).getByRole('button', { name: 'Cancel' }).click();
  await job(again).and(page.locator('[data-status="canceled"]')).waitFor(WAIT);
});

test('a failed job shows its error, and a retry shows the last error while it waits', async () => {
  let calls = 0;
  const local = createLocalProvider({ latencyMs: 0 });
  const provider: ImageProvider = {
    name: 'flaky',
    async generate(request, signal, hooks) {
      calls++;
      if (request.prompt.includes('refused')) throw new ProviderError('permanent', 'the model refused this prompt (content policy)');
      if (calls === 1) throw new ProviderError('retryable', 'the model is warming up (503)');
      return local.generate(request, signal, hooks);
    },
  };
  const svc = await start({ provider, env: { JOB_RETRY_DELAY_SECONDS: '3' } });
  await page.goto(svc.baseUrl);

  const retried = await generate('A retried sunrise');
  await job(retried).locator('.error').filter({ hasText: 'Last error (will retry): the model is warming up (503)' }).waitFor(WAIT);
  await job(retried).and(page.locator('[data-status="completed"]')).waitFor(WAIT);
  await expect(job(retried).locator('.job-facts').textContent()).resolves.toContain('attempt 2');

  const refused = await generate('A refused image');
  await job(refused).and(page.locator('[data-status="failed"]')).waitFor(WAIT);
  const failed = await apiJob(svc, refused);
  expect(failed.error).toContain('the model refused this prompt');
  await expect(job(refused).locator('.error').textContent()).resolves.toBe(`Error: ${failed.error}`);
});

test('a queued job shows its position, and it moves as the queue does', async () => {
  const svc = await start({ worker: false });
  const ids: string[] = [];
  for (const prompt of ['first in line', 'second in line']) ids.push(((await (await submit(svc.baseUrl, { prompt })).json()) as { job_id: string }).job_id);
  await page.goto(svc.baseUrl);
  await job(ids[1]).locator('.position').filter({ hasText: 'position 2 in the queue' }).waitFor(WAIT);
  await fetch(`${svc.baseUrl}/jobs/${ids[0]}/cancel`, { method: 'POST' });
  await job(ids[1]).locator('.position').filter({ hasText: 'position 1 in the queue' }).waitFor(WAIT);
  await job(ids[0]).and(page.locator('[data-status="canceled"]')).waitFor(WAIT);
});

test('with keys required, the page says so, then works with a key kept in the browser', async () => {
  const svc = await start({ env: { ANONYMOUS_ACCESS: 'off' } });
  const key = await createApiKey(svc.databaseUrl, { name: 'page' });
  await page.goto(svc.baseUrl);
  await page.getByRole('alert').filter({ hasText: 'needs an API key' }).waitFor(WAIT);

  await page.getByLabel('API key').fill(key); // the page opened the field for it
  await page.getByLabel('API key').press('Tab'); // commits the field (change)
  await page.getByRole('alert').waitFor({ state: 'hidden' });
  const id = await generate('A keyed lighthouse', { size: '256x256' });
  await job(id).and(page.locator('[data-status="completed"]')).waitFor(WAIT);
  // the job belongs to the key: the API shows it to the key, and to no one else
  expect((await apiJob(svc, id, { authorization: `Bearer ${key}` })).status).toBe('completed');
  expect((await fetch(`${svc.baseUrl}/jobs/${id}`)).status).toBe(401);
  await page.locator(`#gallery button[data-job-id="${id}"] img`).waitFor(WAIT);

  // kept across a reload, and the list comes back
  await page.reload();
  await expect(page.getByLabel('API key').inputValue()).resolves.toBe(key);
  await job(id).and(page.locator('[data-status="completed"]')).waitFor(WAIT);
  await page.getByText('API key', { exact: true }).click(); // open the disclosure
  await page.getByRole('button', { name: 'Forget key' }).click();
  await expect(page.evaluate('localStorage.length')).resolves.toBe(0);
  // Closed first: without a key the page goes on asking (and being refused), so only a closed page has
  // said everything it will.
  await page.close();
  pageErrors.splice(0).forEach((e) => expect(e).toMatch(/401/)); // the page's requests without a key were refused, as they should be
});

test('the form works from the keyboard alone', async () => {
  const svc = await start();
  await page.goto(svc.baseUrl);
  await page.getByLabel('Prompt').focus();
  await page.keyboard.type('Typed, not clicked');
  for (let i = 0; i < 5; i++) await page.keyboard.press('Tab'); // size, format, seed, images, API key disclosure
  await page.keyboard.press('Tab'); // the Generate button
  await expect(page.evaluate('document.activeElement.textContent')).resolves.toBe('Generate');
  await page.keyboard.press('Enter');
  await page.locator('#jobs li[data-status="completed"]').waitFor(WAIT);
  const id = (await page.locator('#jobs li').first().getAttribute('data-job-id'))!;
  expect((await waitForStatus(svc.baseUrl, id)).status).toBe('completed');
});
