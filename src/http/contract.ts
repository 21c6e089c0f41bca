// The contract, openapi.yaml: read once, as text (served) and parsed (docs, shared schemas).
import { readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import YAML from 'yaml';

export const specPath = fileURLToPath(new URL('../../openapi.yaml', import.meta.url));
export const specText = readFileSync(specPath, 'utf8');
/** The parts of the contract the code reads; the rest is passed on as is (to swagger-ui). */
export interface Contract {
  paths: Record<string, Record<string, { security?: Record<string, string[]>[] }>>;
  components: { schemas: Record<string, object> };
  security?: Record<string, string[]>[];
  [member: string]: unknown;
}

export const spec = YAML.parse(specText) as Contract;
