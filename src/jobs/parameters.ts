// Resolves a submission's `parameters` (object, JSON string or absent) to validated values with defaults.
import { Ajv } from 'ajv';
import { AppError } from '../errors.ts';
import type { components } from '../http/api-types.ts';
import { spec } from '../http/contract.ts';

export type GenerationParameters = components['schemas']['GenerationParameters'];
export type ResolvedParameters = components['schemas']['ResolvedParameters'];

// The object form is validated by the request validator; the string form is validated here against the
// same schema from the contract, so both give the same errors.
const parametersSchema = spec.components.schemas.GenerationParameters;
const validate = new Ajv({ allErrors: true, useDefaults: true, strict: false }).compile<GenerationParameters>(parametersSchema);

export function resolveParameters(raw: GenerationParameters | string | undefined): ResolvedParameters {
  let value: unknown = raw ?? {};
  if (typeof raw === 'string') {
    try {
      value = JSON.parse(raw);
    } catch (err) {
      throw new AppError('validation_failed', 'parameters is not valid JSON', [
        { path: '/body/parameters', message: `must be a JSON object or a string of JSON: ${(err as Error).message}` },
      ]);
    }
    if (typeof value !== 'object' || value === null || Array.isArray(value)) {
      throw new AppError('validation_failed', 'parameters must encode a JSON object', [
        { path: '/body/parameters', message: 'must be a JSON object or a string of JSON encoding an object' },
      ]);
    }
  }
  const params = structuredClone(value) as GenerationParameters;
  if (!validate(params)) {
    const errors = (validate.errors ?? []).map((e) => {
      const extra = e.keyword === 'additionalProperties' ? `/${(e.params as { additionalProperty: string }).additionalProperty}` : '';
      const message = e.keyword === 'additionalProperties' ? 'is not a known parameter' : (e.message ?? 'is invalid');
      return { path: `/body/parameters${e.instancePath}${extra}`, message };
    });
    throw new AppError('validation_failed', errors.map((e) => `${e.path} ${e.message}`).join('; '), errors);
  }
  return {
    width: params.width ?? 512,
    height: params.height ?? 512,
    output_format: params.output_format ?? 'png',
    num_outputs: params.num_outputs ?? 1,
    ...(params.seed === undefined ? {} : { seed: params.seed }),
  };
}

/**
 * What the contract's schema cannot say about a prompt: it must be well-formed Unicode without NUL (or
 * it could not be stored as sent), and hold at least one visible character (not only spaces, controls
 * or zero-width marks).
 */
export function checkPrompt(prompt: string): void {
  if (!prompt.isWellFormed() || prompt.includes('\u0000')) {
    throw new AppError('validation_failed', 'prompt must be Unicode text without NUL characters or unpaired surrogates', [
      { path: '/body/prompt', message: 'must be Unicode text without NUL characters or unpaired surrogates' },
    ]);
  }
  if (!/[\p{L}\p{N}\p{P}\p{S}]/u.test(prompt)) {
    throw new AppError('validation_failed', 'prompt must contain a visible character', [{ path: '/body/prompt', message: 'must contain a visible character' }]);
  }
}
