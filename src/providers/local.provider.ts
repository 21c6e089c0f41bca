// The offline generator: a deterministic picture drawn from prompt + seed (same input, same pixels),
// so the service runs and demos with no token and no network.
import { createHash } from 'node:crypto';
import { setTimeout as sleep } from 'node:timers/promises';
import type { GenerationHooks, GenerationRequest, GenerationResult, ImageProvider } from './provider.ts';

export interface LocalProviderOptions {
  /** Artificial time per job, for demos and benchmarks. */
  latencyMs: number;
}

export function createLocalProvider(options: LocalProviderOptions): ImageProvider {
  return {
    name: 'local',
    async generate(request: GenerationRequest, signal: AbortSignal, hooks?: GenerationHooks): Promise<GenerationResult> {
      signal.throwIfAborted();
      if (options.latencyMs > 0) {
        const steps = 4;
        for (let step = 1; step <= steps; step++) {
          await sleep(options.latencyMs / steps, undefined, { signal });
          hooks?.onProgress?.(step / steps);
        }
      }
      const images = Array.from({ length: request.numOutputs }, (_, index) => ({
        data: Buffer.from(drawSvg(request, index)),
        contentType: 'image/svg+xml',
      }));
      return { images };
    },
  };
}

/** An SVG of the requested size: a gradient and shapes whose colours and places come from the inputs. */
export function drawSvg(request: Pick<GenerationRequest, 'prompt' | 'seed' | 'width' | 'height'>, index: number): string {
  const random = prng(`${request.prompt}\u0000${request.seed ?? 0}\u0000${index}`);
  const { width: w, height: h } = request;
  const colour = () => `hsl(${Math.floor(random() * 360)},${40 + Math.floor(random() * 50)}%,${30 + Math.floor(random() * 40)}%)`;
  const shapes: string[] = [];
  for (let i = 0; i < 12; i++) {
    const x = Math.round(random() * w);
    const y = Math.round(random() * h);
    const r = Math.round((0.05 + random() * 0.2) * Math.min(w, h));
    shapes.push(
      random() < 0.5
        ? `<circle cx="${x}" cy="${y}" r="${r}" fill="${colour()}" fill-opacity="0.7"/>`
        : `<rect x="${x - r}" y="${y - r}" width="${2 * r}" height="${r}" fill="${colour()}" fill-opacity="0.6" transform="rotate(${Math.round(random() * 90)} ${x} ${y})"/>`,
    );
  }
  return `<svg xmlns="http://www.w3.org/2000/svg" width="${w}" height="${h}" viewBox="0 0 ${w} ${h}">
<defs><linearGradient id="g" x1="0" y1="0" x2="1" y2="1"><stop offset="0" stop-color="${colour()}"/><stop offset="1" stop-color="${colour()}"/></linearGradient></defs>
<rect width="${w}" height="${h}" fill="url(#g)"/>${shapes.join('')}</svg>`;
}

/** mulberry32 seeded from a hash of `key`: a small deterministic PRNG. */
function prng(key: string): () => number {
  let a = createHash('sha256').update(key).digest().readUInt32LE(0);
  return () => {
    a = (a + 0x6d2b79f5) | 0;
    let t = Math.imul(a ^ (a >>> 15), 1 | a);
    t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}
