// Child process: the baseline of the pipeline-throughput scenario. The same image work a generate job
// does (render with the offline generator at 0 ms, normalise, thumbnail, two durable file writes), with
// the service's own functions, in a plain loop of BENCH_PIPELINE.concurrency workers and no queue, no
// database. Runs until `count` images are done or `capSeconds` have passed; reports images/s and CPU
// per image over IPC.
import { parseConfig } from '../src/config.ts';
import { makeThumbnail, normalizeImage } from '../src/media/normalize.ts';
import { createLocalStorage, mediaFileName, newAttemptToken, thumbnailFileName } from '../src/media/storage.ts';
import { createLocalProvider } from '../src/providers/local.provider.ts';
import { nowMs } from './common.ts';

export interface PipelineSpec {
  count: number;
  concurrency: number;
  capSeconds: number;
  mediaDir: string;
  width: number;
  height: number;
  format: 'png' | 'webp' | 'jpeg';
}

const send = (m: Record<string, unknown>) => process.send?.(m);
process.on('disconnect', () => process.exit(1));
process.on('message', (m: { cmd?: string }) => {
  if (m.cmd === 'stop') process.exit(0);
});

try {
  const spec = JSON.parse(process.env.BENCH_PIPELINE!) as PipelineSpec;
  const { MAX_IMAGE_PIXELS } = parseConfig({});
  const provider = createLocalProvider({ latencyMs: 0 });
  const storage = await createLocalStorage(spec.mediaDir);
  const signal = new AbortController().signal;

  const oneImage = async (n: number) => {
    const jobId = crypto.randomUUID();
    const { images } = await provider.generate(
      { jobId, prompt: `bench image ${n}`, width: spec.width, height: spec.height, outputFormat: spec.format, numOutputs: 1 },
      signal,
    );
    const normalized = await normalizeImage(images[0].data, { width: spec.width, height: spec.height, format: spec.format, maxPixels: MAX_IMAGE_PIXELS });
    const token = newAttemptToken();
    await storage.write(thumbnailFileName(jobId, 1, token, 0), await makeThumbnail(normalized.data));
    await storage.write(mediaFileName(jobId, 1, token, 0, spec.format), normalized.data);
  };

  const t0 = nowMs();
  const cpu0 = process.cpuUsage();
  const deadline = t0 + spec.capSeconds * 1000;
  let next = 0;
  let done = 0;
  await Promise.all(
    Array.from({ length: spec.concurrency }, async () => {
      while (next < spec.count && nowMs() < deadline) {
        await oneImage(next++);
        done++;
      }
    }),
  );
  const seconds = (nowMs() - t0) / 1000;
  const cpu = process.cpuUsage(cpu0);
  send({
    type: 'result',
    done,
    seconds,
    perSecond: done / seconds,
    cpuMsPerImage: (cpu.user + cpu.system) / 1000 / Math.max(1, done),
    capped: done < spec.count,
  });
} catch (err) {
  send({ type: 'fatal', error: err instanceof Error ? (err.stack ?? err.message) : String(err) });
  process.exit(1);
}
