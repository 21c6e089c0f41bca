// The one interface every image generator implements, and the errors it may throw.

export type OutputFormat = 'png' | 'webp' | 'jpeg';

/** What a worker asks a provider for: the job's validated, defaulted request. */
export interface GenerationRequest {
  jobId: string;
  prompt: string;
  width: number;
  height: number;
  outputFormat: OutputFormat;
  seed?: number;
  numOutputs: number;
}

/** One image as the provider produced it: encoded bytes in any format sharp can decode. */
export interface GeneratedImage {
  data: Buffer;
  contentType?: string;
}

export interface GenerationResult {
  images: GeneratedImage[];
  /** The provider's own id for the work (Replicate's prediction id). */
  predictionId?: string;
  /** Model time the provider reported (Replicate's `metrics.predict_time`), in milliseconds. */
  predictTimeMs?: number;
}

/** Progress the provider reports while it works, from 0 to 1. */
export type ProgressListener = (fraction: number) => void;

/** Tells the worker what the provider started, before it finishes (so a crash still leaves a trace). */
export interface GenerationHooks {
  onPrediction?: (predictionId: string) => void;
  onProgress?: ProgressListener;
}

export interface ImageProvider {
  readonly name: string;
  /**
   * Produce `request.numOutputs` images. Must stop promptly when `signal` aborts (and cancel any
   * remote work). Throws a ProviderError for anything the provider did wrong or refused.
   */
  generate(request: GenerationRequest, signal: AbortSignal, hooks?: GenerationHooks): Promise<GenerationResult>;
}

/**
 * `retryable`: worth another attempt later (5xx, network, timeouts, unusable output).
 * `permanent`: the same request will fail again (bad token, invalid input, content policy); fail the job now.
 */
export type ProviderErrorKind = 'retryable' | 'permanent';

export class ProviderError extends Error {
  readonly kind: ProviderErrorKind;
  readonly predictionId?: string;
  readonly predictTimeMs?: number;

  constructor(kind: ProviderErrorKind, message: string, options: { cause?: unknown; predictionId?: string; predictTimeMs?: number } = {}) {
    super(message, { cause: options.cause });
    this.name = 'ProviderError';
    this.kind = kind;
    this.predictionId = options.predictionId;
    this.predictTimeMs = options.predictTimeMs;
  }
}
