// The only place that uses sharp: decode a provider's image safely, then produce the exact requested
// size and format with metadata stripped.
import sharp from 'sharp';
import type { OutputFormat } from '../providers/provider.ts';

// A service, not a desktop app: no cache of decoded images between requests, and libvips' own thread
// pool (one thread per core by default) does the pixel work off the Node event loop.
sharp.cache(false);

export interface NormalizeOptions {
  width: number;
  height: number;
  format: OutputFormat;
  /** Images whose header declares more pixels than this are refused before decoding (bombs). */
  maxPixels: number;
}

export interface NormalizedImage {
  data: Buffer;
  width: number;
  height: number;
  format: OutputFormat;
  bytes: number;
}

export class ImageDecodeError extends Error {
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'ImageDecodeError';
  }
}

export async function normalizeImage(input: Buffer, options: NormalizeOptions): Promise<NormalizedImage> {
  try {
    const pipeline = sharp(input, { limitInputPixels: options.maxPixels, failOn: 'error', sequentialRead: true })
      .rotate() // honour EXIF orientation, then drop the metadata (sharp strips it unless asked not to)
      .resize(options.width, options.height, { fit: 'cover', position: 'attention' });
    const encoded =
      options.format === 'png'
        ? pipeline.png({ compressionLevel: 6 })
        : options.format === 'webp'
          ? pipeline.webp({ quality: 90 })
          : pipeline.jpeg({ quality: 90 });
    const { data, info } = await encoded.toBuffer({ resolveWithObject: true });
    return { data, width: info.width, height: info.height, format: options.format, bytes: info.size };
  } catch (err) {
    throw new ImageDecodeError(`not a usable image: ${(err as Error).message}`, { cause: err });
  }
}

/** Width, height and format of an encoded image, from its header (for tests and checks). */
export async function probeImage(input: Buffer): Promise<{ width: number; height: number; format: string }> {
  const meta = await sharp(input).metadata();
  return { width: meta.width, height: meta.height, format: meta.format };
}

/** A small WebP preview of an (already normalised) image: at most `maxSide` px on its longer side. */
export async function makeThumbnail(input: Buffer, maxSide = 256): Promise<Buffer> {
  return sharp(input, { failOn: 'error' }).resize(maxSide, maxSide, { fit: 'inside', withoutEnlargement: true }).webp({ quality: 75 }).toBuffer();
}
