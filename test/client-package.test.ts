// The typed client installed in another project: `npm pack` this package, unpack it into a fresh
// project's node_modules (beside the client's one dependency, openapi-fetch), then use it against a real
// server from plain JavaScript on the machine's own Node (20 here; Node strips no types under
// node_modules at all), and type-check a TypeScript user of it.
import { execFile, execFileSync, spawnSync } from 'node:child_process';
import { promisify } from 'node:util';
import { existsSync, mkdirSync, mkdtempSync, readdirSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { startTestService, type TestService } from './support/harness.ts';

const root = fileURLToPath(new URL('..', import.meta.url));
const require = createRequire(import.meta.url);
const packageDir = (name: string) => path.dirname(require.resolve(`${name}/package.json`));

let svc: TestService;
let project: string;
beforeAll(async () => {
  project = mkdtempSync(path.join(tmpdir(), 'client-user-'));
  const packed = JSON.parse(
    execFileSync('npm', ['pack', '--json', '--pack-destination', project], {
      cwd: root,
      encoding: 'utf8',
      env: { ...process.env, npm_config_update_notifier: 'false' },
    }),
  ) as { filename: string; files: { path: string }[] }[];
  const installed = path.join(project, 'node_modules', 'media-gen-service');
  mkdirSync(installed, { recursive: true });
  execFileSync('tar', ['-xzf', path.join(project, packed[0].filename), '-C', installed, '--strip-components=1']);
  for (const dependency of ['openapi-fetch', 'openapi-typescript-helpers']) symlinkSync(packageDir(dependency), path.join(project, 'node_modules', dependency));
  writeFileSync(path.join(project, 'package.json'), JSON.stringify({ name: 'client-user', private: true, type: 'module' }));
  svc = await startTestService();
}, 120_000);
afterAll(async () => {
  await svc?.stop();
  rmSync(project, { recursive: true, force: true });
});

/** The machine's own Node when there is one (older than the project's), else the one running the tests. */
function systemNode(): string {
  return ['/usr/bin/node', '/usr/local/bin/node'].find((p) => existsSync(p)) ?? process.execPath;
}

test('the package holds the client as JavaScript with declarations, not TypeScript sources', () => {
  const files = readdirSync(path.join(project, 'node_modules', 'media-gen-service'), { recursive: true }).map(String);
  expect(files).toEqual(expect.arrayContaining(['dist/client/index.js', 'dist/client/index.d.ts', 'openapi.yaml']));
  expect(files.filter((f) => f.endsWith('.ts') && !f.endsWith('.d.ts'))).toEqual([]);
});

test('plain JavaScript in another project submits a job and follows it to completion', async () => {
  writeFileSync(
    path.join(project, 'use.mjs'),
    `import { createMediaClient } from 'media-gen-service/client';
const api = createMediaClient(process.argv[2]);
const { data, error } = await api.POST('/generate', { body: { prompt: 'from another project', parameters: { width: 64, height: 64 } } });
if (error) throw new Error(error.detail);
for (;;) {
  const { data: job } = await api.GET('/status/{job_id}', { params: { path: { job_id: data.job_id } } });
  if (['completed', 'failed', 'canceled'].includes(job.status)) {
    console.log(JSON.stringify({ node: process.version, status: job.status, result_url: job.result_url }));
    break;
  }
  await new Promise((r) => setTimeout(r, 50));
}
`,
  );
  // not spawnSync: the server answering it runs in this process
  const run = await promisify(execFile)(systemNode(), ['use.mjs', svc.baseUrl], { cwd: project, encoding: 'utf8', env: { PATH: process.env.PATH } });
  expect(run.stderr).toBe('');
  const out = JSON.parse(run.stdout) as { node: string; status: string; result_url: string };
  expect(out).toMatchObject({ status: 'completed', result_url: expect.stringMatching(/^\/media\//) });
  console.log(`client used from Node ${out.node}`);
});

test('TypeScript in another project type-checks against the declarations, and they catch mistakes', () => {
  const tsc = path.join(packageDir('typescript'), 'bin', 'tsc');
  const check = (source: string) => {
    writeFileSync(path.join(project, 'use.ts'), source);
    writeFileSync(
      path.join(project, 'tsconfig.json'),
      JSON.stringify({
        compilerOptions: { module: 'nodenext', moduleResolution: 'nodenext', target: 'es2022', strict: true, noEmit: true, types: [] },
        files: ['use.ts'],
      }),
    );
    return spawnSync(process.execPath, [tsc, '-p', 'tsconfig.json'], { cwd: project, encoding: 'utf8' });
  };
  const good = check(`import { createMediaClient, type JobStatus } from 'media-gen-service/client';
const api = createMediaClient('http://localhost:8000');
export async function follow(id: string): Promise<JobStatus['status'] | undefined> {
  const { data } = await api.GET('/status/{job_id}', { params: { path: { job_id: id } } });
  return data?.status;
}
`);
  expect(good.stdout + good.stderr).toBe('');
  expect(good.status).toBe(0);
  const bad = check(`import { createMediaClient } from 'media-gen-service/client';
await createMediaClient('http://localhost:8000').POST('/generate', { body: { prompt: 42 } });
`);
  expect(bad.stdout).toMatch(/use\.ts\(2,\d+\): error TS2322: Type 'number' is not assignable to type 'string'/);
});
