// Child process: normalisation throughput. The service's normalizeImage (src/media/normalize.ts)
// against sharp called directly for the same output (same size, format and encoder settings), on the
// same 1024×1024 inputs, in interleaved rounds in this one process. Reports images/s and images/s per
// core per round over IPC.
import { availableParallelism } from 'node:os';
import sharp from 'sharp';
import { normalizeImage } from '../src/media/normalize.ts';
import { drawSvg } from '../src/providers/local.provider.ts';
import { nowMs } from './common.ts';

type Format = 'png' | 'webp';
const send = (m: object) => process.send?.(m);
process.on('disconnect', () => process.exit(1));

const SIZE = 1024;
const OUT = 512;

/** Photo-like inputs: the offline generator's picture at 1024×1024 with sensor-like noise, as PNG. */
async function makeInputs(count: number): Promise<Buffer[]> {
  const inputs: Buffer[] = [];
  for (let i = 0; i < count; i++) {
    const { data, info } = await sharp(Buffer.from(drawSvg({ prompt: `bench input ${i}`, seed: i, width: SIZE, height: SIZE }, 0)))
      .removeAlpha()
      .raw()
      .toBuffer({ resolveWithObject: true });
    let s = 0x9e3779b9 ^ i;
    for (let p = 0; p < data.length; p++) {
      s = (s * 1103515245 + 12345) >>> 0;
      const v = data[p] + ((s >>> 24) % 25) - 12;
      data[p] = v < 0 ? 0 : v > 255 ? 255 : v;
    }
    inputs.push(
      await sharp(data, { raw: { width: info.width, height: info.height, channels: info.channels } })
        .png()
        .toBuffer(),
    );
  }
  return inputs;
}

const ours = (input: Buffer, format: Format) => normalizeImage(input, { width: OUT, height: OUT, format, maxPixels: 64 * 1024 * 1024 }).then((r) => r.bytes);

const direct = (input: Buffer, format: Format) => {
  const resized = sharp(input).resize(OUT, OUT);
  return (format === 'png' ? resized.png({ compressionLevel: 6 }) : resized.webp({ quality: 90 })).toBuffer().then((b) => b.length);
};

/** `count` images through `fn`, `parallel` at a time; images per second. */
async function rate(fn: typeof ours, inputs: Buffer[], format: Format, count: number, parallel: number): Promise<number> {
  let next = 0;
  const started = nowMs();
  await Promise.all(
    Array.from({ length: parallel }, async () => {
      while (next < count) {
        const i = next++;
        await fn(inputs[i % inputs.length], format);
      }
    }),
  );
  return count / ((nowMs() - started) / 1000);
}

try {
  const { rounds, imagesPerRound } = JSON.parse(process.env.BENCH_NORMALIZE!) as { rounds: number; imagesPerRound: number };
  const cores = availableParallelism();
  // As many images at once as libvips has threads for (sharp.concurrency() is per image; libuv runs
  // up to 4 images at a time).
  const parallel = Math.max(2, Math.min(4, cores));
  const inputs = await makeInputs(4);
  for (const format of ['png', 'webp'] as const) {
    await rate(ours, inputs, format, 4, parallel); // warm-up
    await rate(direct, inputs, format, 4, parallel);
  }
  const results: { round: number; format: Format; ours: number; direct: number }[] = [];
  for (let round = 0; round < rounds; round++) {
    for (const format of ['png', 'webp'] as const) {
      // Interleaved, and alternating which goes first.
      let o: number;
      let d: number;
      if (round % 2 === 0) {
        o = await rate(ours, inputs, format, imagesPerRound, parallel);
        d = await rate(direct, inputs, format, imagesPerRound, parallel);
      } else {
        d = await rate(direct, inputs, format, imagesPerRound, parallel);
        o = await rate(ours, inputs, format, imagesPerRound, parallel);
      }
      results.push({ round, format, ours: o / cores, direct: d / cores });
    }
  }
  send({
    type: 'result',
    cores,
    parallel,
    inputBytes: inputs.map((b) => b.length),
    libvipsThreads: sharp.concurrency(),
    results,
  });
  process.exit(0);
} catch (err) {
  send({ type: 'fatal', error: err instanceof Error ? (err.stack ?? err.message) : String(err) });
  process.exit(1);
}
