// docker-compose.yml: what a user puts in .env reaches the containers, the containers keep what they
// need whatever .env says, and every variable compose reads is documented in .env.example.
// (`docker-compose config -q` validates the file's schema where Docker Compose is installed.)
import { readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { parse } from 'yaml';

const read = (file: string) => readFileSync(fileURLToPath(new URL(`../${file}`, import.meta.url)), 'utf8');
const composeText = read('docker-compose.yml');
const compose = parse(composeText, { merge: true }) as {
  services: Record<string, { build?: string; env_file?: string | string[]; environment?: Record<string, string> }>;
};
const appServices = Object.entries(compose.services).filter(([, s]) => s.build);

test('the service containers (migrate, api, worker) all read .env', () => {
  expect(appServices.map(([name]) => name).sort()).toEqual(['api', 'migrate', 'worker']);
  for (const [, service] of appServices) expect([service.env_file].flat()).toContain('.env');
  // .env stays out of the image (secrets are not baked in): env_file is how it gets there
  expect(read('.dockerignore').split('\n')).toContain('.env');
});

test('what the containers need is pinned, whatever .env says (a copied .env.example sets PORT, HOST, DATABASE_URL, …)', () => {
  for (const [, service] of appServices) {
    expect(service.environment).toMatchObject({
      DATABASE_URL: expect.stringMatching(/@postgres:5432\//),
      MEDIA_DIR: '/app/media',
      NODE_ENV: 'production',
      HOST: '0.0.0.0',
      PORT: '8000',
      RUN_MIGRATIONS: 'false',
    });
  }
});

test('every variable compose reads is documented in .env.example', () => {
  const used = new Set([...composeText.matchAll(/\$\{([A-Z][A-Z0-9_]*)/g)].map((m) => m[1]));
  const documented = new Set([...read('.env.example').matchAll(/^#?\s*([A-Z][A-Z0-9_]*)=/gm)].map((m) => m[1]));
  expect([...used].filter((v) => !documented.has(v))).toEqual([]);
  expect(used).toContain('POSTGRES_PASSWORD');
});
