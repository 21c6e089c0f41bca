// Hostile provider output: a decompression bomb, truncated images, bytes that are no image, hostile SVG,
// and images far over the configured caps. Each fails its attempt cleanly (a clear error on the attempt
// row and in /status), the process never crashes, and memory stays bounded.
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { inspect } from 'node:util';
import { crc32, deflateSync } from 'node:zlib';
import sharp from 'sharp';
import { listAttempts } from '../src/jobs/job.repository.ts';
import { createLocalProvider } from '../src/providers/local.provider.ts';
import type { ImageProvider } from '../src/providers/provider.ts';
import { startTestService, submit, waitForStatus, type StatusBody, type TestService } from './support/harness.ts';

// --- hostile images, built at test time ---------------------------------------------------------

function pngChunk(type: string, data: Buffer): Buffer {
  const length = Buffer.alloc(4);
  length.writeUInt32BE(data.length);
  const body = Buffer.concat([Buffer.from(type, 'latin1'), data]);
  const crc = Buffer.alloc(4);
  crc.writeUInt32BE(crc32(body) >>> 0);
  return Buffer.concat([length, body, crc]);
}

/**
 * A valid PNG of `width`×`height` pixels of one colour, tiny on disk: 1-bit palette rows of zeros
 * deflate about 1000:1, but a decoder expands each pixel to 3 bytes of RGB. 30000×30000 is ~110 KB
 * of file for 2.7 GB decoded.
 */
function paletteBomb(width: number, height: number): Buffer {
  const ihdr = Buffer.alloc(13);
  ihdr.writeUInt32BE(width, 0);
  ihdr.writeUInt32BE(height, 4);
  ihdr[8] = 1; // bit depth
  ihdr[9] = 3; // colour type: palette
  const raw = Buffer.alloc((1 + Math.ceil(width / 8)) * height); // filter byte 0, palette index 0, every row
  return Buffer.concat([
    Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]),
    pngChunk('IHDR', ihdr),
    pngChunk('PLTE', Buffer.from([200, 30, 60])),
    pngChunk('IDAT', deflateSync(raw, { level: 9 })),
    pngChunk('IEND', Buffer.alloc(0)),
  ]);
}

const noise = (width: number, height: number) =>
  sharp({ create: { width, height, channels: 3, background: '#000', noise: { type: 'gaussian', mean: 128, sigma: 60 } } });

const BOMB_SIDE = 30_000;
const PIXEL_CAP = 2048 * 2048; // the largest size a job may ask for
const BYTE_CAP = 2 * 1024 * 1024;
const scratch = mkdtempSync(path.join(tmpdir(), 'hostile-output-'));
const RED_PNG_PATH = path.join(scratch, 'red.png'); // a local file a hostile SVG tries to embed

const images: Record<string, Buffer> = {};
let bigBytes: Buffer;

async function buildImages(): Promise<void> {
  images.bomb = paletteBomb(BOMB_SIDE, BOMB_SIDE);
  const png = await noise(256, 256).png().toBuffer();
  const jpeg = await noise(256, 256).jpeg().toBuffer();
  const webp = await noise(256, 256).webp().toBuffer();
  images['truncated png'] = png.subarray(0, png.length >> 1);
  images['truncated jpeg'] = jpeg.subarray(0, jpeg.length >> 1);
  images['truncated webp'] = webp.subarray(0, webp.length >> 1);
  images['html'] = Buffer.from('<!doctype html><html><body>502 Bad Gateway</body></html>');
  images['json'] = Buffer.from('{"error":"model crashed"}');
  images['empty'] = Buffer.alloc(0);
  images['random bytes'] = Buffer.from(Array.from({ length: 4096 }, (_, i) => (i * 2654435761) >>> 24));
  images['png signature then garbage'] = Buffer.concat([png.subarray(0, 8), Buffer.alloc(1024, 0xa5)]);
  images['svg declaring a huge canvas'] = Buffer.from(
    `<svg xmlns="http://www.w3.org/2000/svg" width="${BOMB_SIDE}" height="${BOMB_SIDE}"><rect width="${BOMB_SIDE}" height="${BOMB_SIDE}" fill="red"/></svg>`,
  );
  const entities = Array.from({ length: 8 }, (_, i) => `<!ENTITY e${i + 1} "${`&e${i};`.repeat(10)}">`).join('');
  images['svg billion laughs'] = Buffer.from(
    `<?xml version="1.0"?><!DOCTYPE svg [<!ENTITY e0 "lollollollol">${entities}]><svg xmlns="http://www.w3.org/2000/svg" width="64" height="64"><text y="20">&e8;</text></svg>`,
  );
  // far over the pixel cap (4x per side), though small and perfectly ordinary as a file
  images['over the pixel cap'] = await sharp({ create: { width: 4 * 2048, height: 2048, channels: 3, background: '#3366aa' } })
    .jpeg()
    .toBuffer();
  // far over the byte cap (about 6x), though within the pixel cap: an honest, incompressible 2048×2048 PNG
  bigBytes = await noise(2048, 2048).png({ compressionLevel: 0 }).toBuffer();
  images['over the byte cap'] = bigBytes;
  images['under both caps'] = await noise(1024, 1024).jpeg({ quality: 80 }).toBuffer();
  await sharp({ create: { width: 64, height: 64, channels: 3, background: '#ff0000' } })
    .png()
    .toFile(RED_PNG_PATH);
  images['svg reading a local file'] = Buffer.from(
    `<svg xmlns="http://www.w3.org/2000/svg" xmlns:xlink="http://www.w3.org/1999/xlink" width="64" height="64"><rect width="64" height="64" fill="#ffffff"/>` +
      `<image href="file://${RED_PNG_PATH}" xlink:href="file://${RED_PNG_PATH}" width="64" height="64"/><image href="${RED_PNG_PATH}" width="64" height="64"/></svg>`,
  );
}

/** Returns the image named by the prompt; any other prompt draws normally. */
const local = createLocalProvider({ latencyMs: 0 });
const hostile: ImageProvider = {
  name: 'hostile',
  async generate(request, signal) {
    const data = images[request.prompt];
    return data ? { images: [{ data }] } : local.generate(request, signal);
  },
};

// --- the service ---------------------------------------------------------------------------------

// As in outage.test.ts: the real process (jest's `process` is a sandbox copy whose listeners never fire).
const realProcess = (inspect.constructor as FunctionConstructor)('return process')() as NodeJS.Process;
const unhandled: unknown[] = [];
const onUnhandled = (reason: unknown) => void unhandled.push(reason);

let svc: TestService;
beforeAll(async () => {
  expect(realProcess).not.toBe(process);
  realProcess.on('unhandledRejection', onUnhandled);
  realProcess.on('uncaughtException', onUnhandled);
  await buildImages();
  expect(images.bomb.length).toBeLessThan(200 * 1024);
  expect(bigBytes.length).toBeGreaterThan(5 * BYTE_CAP);
  svc = await startTestService({
    provider: hostile,
    env: {
      JOB_RETRY_LIMIT: '0', // the first failed attempt fails the job, so /status shows it at once
      MAX_IMAGE_PIXELS: String(PIXEL_CAP),
      // the cap on the bytes of one provider image, checked by the worker before decoding
      MAX_IMAGE_BYTES: String(BYTE_CAP),
      WORKER_CONCURRENCY: '4',
    },
  });
  expect(svc.config).toMatchObject({ MAX_IMAGE_PIXELS: PIXEL_CAP, MAX_IMAGE_BYTES: BYTE_CAP }); // the caps really apply
}, 60_000);

afterAll(async () => {
  realProcess.off('unhandledRejection', onUnhandled);
  realProcess.off('uncaughtException', onUnhandled);
  await svc?.stop();
  rmSync(scratch, { recursive: true, force: true });
});

async function run(prompt: string, parameters: Record<string, unknown> = { width: 256, height: 256 }): Promise<StatusBody> {
  const res = await submit(svc.baseUrl, { prompt, parameters });
  expect(res.status).toBe(202);
  const { job_id } = (await res.json()) as { job_id: string };
  return waitForStatus(svc.baseUrl, job_id, ['completed', 'failed'], 30_000);
}

/** The job failed on its one attempt, with `error` on both the attempt row and /status. */
async function expectFailedCleanly(status: StatusBody, error: RegExp) {
  expect(status).toMatchObject({ status: 'failed', attempts: 1, outputs: [] });
  expect(status.error).toMatch(error);
  expect(status.error).toMatch(/output 1 of the provider/);
  const attempts = await listAttempts(svc.db, status.job_id);
  expect(attempts).toHaveLength(1);
  expect(attempts[0]).toMatchObject({ outcome: 'failed', error: status.error });
  expect(attempts[0].error_kind).toEqual(expect.any(String));
  expect(attempts[0].finished_at).toBeInstanceOf(Date);
  const health = await fetch(`${svc.baseUrl}/healthz`);
  expect(health.status).toBe(200);
}

/** The peak RSS growth of this process while `work` runs, sampled every 5 ms. */
async function peakRssGrowth<T>(work: () => Promise<T>): Promise<{ value: T; growthBytes: number }> {
  const baseline = process.memoryUsage.rss();
  let peak = baseline;
  const sampler = setInterval(() => {
    peak = Math.max(peak, process.memoryUsage.rss());
  }, 5);
  try {
    const value = await work();
    peak = Math.max(peak, process.memoryUsage.rss());
    return { value, growthBytes: peak - baseline };
  } finally {
    clearInterval(sampler);
  }
}

const MB = 1024 * 1024;

// How memory is checked: the worker runs inside this jest process (startTestService), and libvips
// allocates decoded pixels natively, which shows in the process RSS but not in the V8 heap. We sample
// process.memoryUsage.rss() every 5 ms from submission until the job has failed and take the peak over
// the baseline. Decoding the bomb would need 30000×30000×3 bytes ≈ 2.5 GiB; we allow 150 MB of growth.
// The control test after it decodes a 108 MB image with the same sampler running and sees it, so the
// sampler does catch native decoding (run after the bomb, so freed pages cannot hide the bomb's growth).
describe('a decompression bomb', () => {
  test('a 110 KB PNG declaring 30000×30000 fails cleanly without being decoded', async () => {
    const meta = await sharp(images.bomb, { limitInputPixels: false }).metadata();
    expect([meta.width, meta.height, meta.format]).toEqual([BOMB_SIDE, BOMB_SIDE, 'png']); // it really is that image
    const { value: status, growthBytes } = await peakRssGrowth(() => run('bomb'));
    await expectFailedCleanly(status, /pixel limit/i);
    expect(growthBytes).toBeLessThan(150 * MB);
  });

  test('an SVG declaring a 30000×30000 canvas fails cleanly the same way', async () => {
    const { value: status, growthBytes } = await peakRssGrowth(() => run('svg declaring a huge canvas'));
    await expectFailedCleanly(status, /pixel limit/i);
    expect(growthBytes).toBeLessThan(150 * MB);
  });

  test('control: the sampler sees a native decode of 108 MB', async () => {
    const { growthBytes } = await peakRssGrowth(async () => {
      const { data } = await sharp(paletteBomb(6000, 6000)).raw().toBuffer({ resolveWithObject: true });
      expect(data.length).toBe(6000 * 6000 * 3);
      return data.length;
    });
    expect(growthBytes).toBeGreaterThan(80 * MB);
  });
});

describe('broken images', () => {
  test.each([
    ['truncated png', /not a usable image/],
    ['truncated jpeg', /not a usable image/],
    ['truncated webp', /not a usable image/],
  ])('a %s (a real image cut in half) fails cleanly', async (prompt, error) => {
    await expectFailedCleanly(await run(prompt), error);
  });

  test.each([
    ['html', /unsupported image format/i],
    ['json', /unsupported image format/i],
    ['empty', /empty/i],
    ['random bytes', /unsupported image format/i],
    ['png signature then garbage', /not a usable image/],
    ['svg billion laughs', /not a usable image/],
  ])('%s instead of an image fails cleanly', async (prompt, error) => {
    await expectFailedCleanly(await run(prompt), error);
  });
});

describe('images over the configured caps', () => {
  test('an image with 4x the pixels MAX_IMAGE_PIXELS allows fails cleanly', async () => {
    const meta = await sharp(images['over the pixel cap']).metadata();
    expect(meta.width * meta.height).toBe(4 * PIXEL_CAP);
    await expectFailedCleanly(await run('over the pixel cap'), /pixel limit/i);
  });

  test('an image of about 6x MAX_IMAGE_BYTES fails cleanly, refused before decoding', async () => {
    const status = await run('over the byte cap');
    await expectFailedCleanly(status, /bytes|too large|larger than/i);
  });

  test('control: an ordinary image under both caps is accepted and normalised', async () => {
    const status = await run('under both caps', { width: 512, height: 512, output_format: 'webp' });
    expect(status).toMatchObject({ status: 'completed', outputs: [{ width: 512, height: 512, format: 'webp' }] });
  });
});

describe('the process is unharmed', () => {
  test('an SVG that references a local file does not read it', async () => {
    const status = await run('svg reading a local file', { width: 64, height: 64, output_format: 'png' });
    expect(status.status).toBe('completed');
    const served = Buffer.from(await (await fetch(`${svc.baseUrl}${status.result_url}`)).arrayBuffer());
    const { data } = await sharp(served).removeAlpha().raw().toBuffer({ resolveWithObject: true });
    expect([...data.subarray(32 * 64 * 3, 32 * 64 * 3 + 3)]).toEqual([255, 255, 255]); // white, not the file's red
  });

  test('after all of it, an ordinary job completes and nothing went unhandled', async () => {
    const status = await run('an ordinary picture', { width: 128, height: 128 });
    expect(status).toMatchObject({ status: 'completed', attempts: 1 });
    expect((await fetch(`${svc.baseUrl}/readyz`)).status).toBe(200);
    expect(unhandled.map(String)).toEqual([]);
  });
});
