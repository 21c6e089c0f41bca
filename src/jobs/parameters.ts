// Resolves a submission's `parameters` (object, JSON string or absent) to validated values with defaults.
import { Ajv } from 'ajv';
import { AppError, type FieldError } from '../errors.ts';
import type { components } from '../http/api-types.ts';
import { spec } from '../http/contract.ts';

export type GenerationParameters = components['schemas']['GenerationParameters'];
export type ResolvedParameters = components['schemas']['ResolvedParameters'];

// One validation for both forms, against the contract's schema: the request validator only sees a `oneOf`
// (an object or a string), so its errors for `parameters` are replaced by these (see http/problem.ts).
const parametersSchema = spec.components.schemas.GenerationParameters;
const validate = new Ajv({ allErrors: true, strict: false }).compile<GenerationParameters>(parametersSchema);
const MAX_STRING_LENGTH = 4096;

/** What is wrong with a submission's `parameters` (object, JSON string or absent); empty when valid. */
export function parameterErrors(raw: unknown): FieldError[] {
  if (raw === undefined) return [];
  let value: unknown = raw;
  if (typeof raw === 'string') {
    if (raw.length > MAX_STRING_LENGTH) return [{ path: '/body/parameters', message: `must NOT have more than ${MAX_STRING_LENGTH} characters` }];
    try {
      value = JSON.parse(raw) as unknown;
    } catch (err) {
      return [{ path: '/body/parameters', message: `must be a JSON object or a string of JSON: ${(err as Error).message}` }];
    }
  }
  if (typeof value !== 'object' || value === null || Array.isArray(value)) {
    return [{ path: '/body/parameters', message: 'must be an object, or a string holding the JSON of one' }];
  }
  if (validate(value)) return [];
  return (validate.errors ?? []).map((e) => {
    if (e.keyword === 'additionalProperties') {
      return {
        path: `/body/parameters${e.instancePath}/${(e.params as { additionalProperty: string }).additionalProperty}`,
        message: 'is not a known parameter',
      };
    }
    const allowed = e.keyword === 'enum' ? `: ${(e.params as { allowedValues: unknown[] }).allowedValues.join(', ')}` : '';
    return { path: `/body/parameters${e.instancePath}`, message: `${e.message ?? 'is invalid'}${allowed}` };
  });
}

export function resolveParameters(raw: GenerationParameters | string | undefined): ResolvedParameters {
  const errors = parameterErrors(raw);
  if (errors.length) throw new AppError('validation_failed', errors.map((e) => `${e.path} ${e.message}`).join('; '), errors);
  const params = (typeof raw === 'string' ? JSON.parse(raw) : (raw ?? {})) as GenerationParameters;
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
