// The contract, openapi.yaml: read once, as text (served) and parsed (docs, shared schemas).
import { readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import YAML from 'yaml';

export const specPath = fileURLToPath(new URL('../../openapi.yaml', import.meta.url));
export const specText = readFileSync(specPath, 'utf8');
export const spec = YAML.parse(specText);
