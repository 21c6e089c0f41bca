// Per-job execution: every slot busy while work waits, no job held or aborted by another, stale attempts
// that can change nothing, canceled jobs that leave no files, and database hiccups that cost no attempt.
import { readdirSync, utimesSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { listAttempts } from '../src/jobs/job.repository.ts';
import { createLocalProvider } from '../src/providers/local.provider.ts';
import type { GenerationRequest, ImageProvider } from '../src/providers/provider.ts';
import { GENERATE } from '../src/queue/queue.ts';
import { createTestDatabase, startTestService, submit, waitFor, waitForStatus, type TestService } from './support/harness.ts';
import { mediaPath, tokenOf } from './support/media-names.ts';
import { withClient } from './support/postgres.ts';

const local = createLocalProvider({ latencyMs: 0 });

interface Call {
  request: GenerationRequest;
  signal: AbortSignal;
  release: () => void;
}

/**
 * A provider whose calls wait until the test releases them (or, if `honourAbort`, until aborted); calls
 * whose prompt starts with "fast" return at once. Draws like the local provider.
 */
function gatedProvider(options: { honourAbort: boolean }): ImageProvider & { calls: Call[]; running: () => Call[]; started: (n: number) => Promise<Call[]> } {
  const calls: Call[] = [];
  const done = new Set<Call>();
  let onCall = () => {};
  return {
    name: 'gated',
    calls,
    running: () => calls.filter((c) => !done.has(c)),
    started: (n) =>
      new Promise((resolve) => {
        const check = () => {
          if (calls.length >= n) resolve(calls.slice(0, n));
        };
        onCall = check;
        check();
      }),
    async generate(request, signal) {
      if (request.prompt.startsWith('fast')) return local.generate(request, signal);
      let release!: () => void;
      const gate = new Promise<void>((r) => (release = r));
      const call: Call = { request, signal, release };
      calls.push(call);
      onCall();
      try {
        if (options.honourAbort) {
          await Promise.race([gate, new Promise((_, reject) => signal.addEventListener('abort', () => reject(signal.reason as Error), { once: true }))]);
        } else {
          await gate; // a provider that does not stop when told: it finishes late
        }
        return await local.generate(request, new AbortController().signal);
      } finally {
        done.add(call);
      }
    },
  };
}

async function jobIdOf(res: Response): Promise<string> {
  expect(res.status).toBe(202);
  return ((await res.json()) as { job_id: string }).job_id;
}

/** Makes the next `times` statements that move a job into `status` fail with a transient error. */
async function injectFaults(databaseUrl: string, status: 'processing' | 'completed', times: number) {
  await withClient(databaseUrl, async (c) => {
    await c.query(`CREATE SEQUENCE IF NOT EXISTS fault_${status}`);
    await c.query(`CREATE OR REPLACE FUNCTION inject_fault() RETURNS trigger LANGUAGE plpgsql AS $$
      BEGIN
        -- a sequence, not a table: it counts even though the failing transaction rolls back
        IF nextval('fault_' || TG_ARGV[0]) <= TG_ARGV[1]::int THEN
          RAISE EXCEPTION 'injected fault on %', TG_ARGV[0] USING ERRCODE = '40001';
        END IF;
        RETURN NEW;
      END $$`);
    await c.query(`CREATE TRIGGER fault_${status} BEFORE UPDATE ON jobs FOR EACH ROW
      WHEN (NEW.status = '${status}' AND OLD.status IS DISTINCT FROM NEW.status) EXECUTE FUNCTION inject_fault('${status}', '${times}')`);
  });
}

async function retryCountOf(databaseUrl: string, id: string): Promise<number> {
  return withClient(
    databaseUrl,
    async (c) => (await c.query<{ retry_count: number }>('select retry_count from pgboss.job where id = $1', [id])).rows[0].retry_count,
  );
}

let svc: TestService | undefined;
const extra: TestService[] = [];
afterEach(async () => {
  for (const s of extra.splice(0)) await s.stop();
  await svc?.stop();
  svc = undefined;
});

test('jobs arriving one by one all run at once, up to the slots; a freed slot is filled at once', async () => {
  const provider = gatedProvider({ honourAbort: true });
  svc = await startTestService({ provider, env: { WORKER_CONCURRENCY: '5', WORKER_BATCH_SIZE: '5' } });
  const ids: string[] = [];
  for (let i = 0; i < 5; i++) {
    ids.push(await jobIdOf(await submit(svc.baseUrl, { prompt: `slow ${i}` })));
    await provider.started(i + 1); // each one starts while the earlier ones still run
  }
  expect(provider.running()).toHaveLength(5);
  expect(svc.worker!.busySlots()).toBe(5);

  // A sixth waits for a slot, and takes the first one that frees up.
  const sixth = await jobIdOf(await submit(svc.baseUrl, { prompt: 'slow 5' }));
  expect((await (await fetch(`${svc.baseUrl}/status/${sixth}`)).json()) as { status: string }).toMatchObject({ status: 'queued', queue_position: 1 });
  provider.calls[2].release();
  await waitForStatus(svc.baseUrl, ids[2], ['completed']);
  const [, , , , , sixthCall] = await provider.started(6);
  expect(sixthCall.request.jobId).toBe(sixth);
  expect(provider.running()).toHaveLength(5);
  for (const call of provider.running()) call.release();
  for (const id of [...ids, sixth]) await waitForStatus(svc.baseUrl, id, ['completed']);
});

test('a slow job holds only its own slot: jobs fetched with it finish while it runs, and its end aborts nobody', async () => {
  const provider = gatedProvider({ honourAbort: true });
  svc = await startTestService({ provider, env: { WORKER_CONCURRENCY: '3', WORKER_BATCH_SIZE: '3' } });
  const slow = await jobIdOf(await submit(svc.baseUrl, { prompt: 'slow one' }));
  const [slowCall] = await provider.started(1);
  const fast = await Promise.all(Array.from({ length: 12 }, async (_, i) => jobIdOf(await submit(svc!.baseUrl, { prompt: `fast ${i}` }))));
  for (const id of fast) await waitForStatus(svc.baseUrl, id, ['completed']);
  expect(slowCall.signal.aborted).toBe(false);
  expect(((await (await fetch(`${svc.baseUrl}/status/${slow}`)).json()) as { status: string }).status).toBe('processing');
  slowCall.release();
  await waitForStatus(svc.baseUrl, slow, ['completed']);
});

test('a stale attempt (claim lost, finishing late) changes neither the served files nor the job, and its files are removed', async () => {
  const provider = gatedProvider({ honourAbort: false });
  svc = await startTestService({ provider, env: { JOB_RETRY_DELAY_SECONDS: '1' } });
  const id = await jobIdOf(await submit(svc.baseUrl, { prompt: 'contested', parameters: { seed: 7 } }));
  const [first] = await provider.started(1);

  // The claim is taken away (as the supervisor does after a missed heartbeat): pg-boss retries the job.
  await svc.boss.fail(GENERATE, id, { error: 'heartbeat missed (simulated)' });
  const [, second] = await provider.started(2);
  second.release();
  const done = await waitForStatus(svc.baseUrl, id, ['completed']);
  expect(done).toMatchObject({ status: 'completed', attempts: 2 });
  expect(done.result_url).toMatch(mediaPath(id, 2, 'png'));
  const served = Buffer.from(await (await fetch(`${svc.baseUrl}${done.result_url}`)).arrayBuffer());

  // The first attempt finishes late, with outputs of its own.
  first.release();
  await waitFor(async () => (svc!.worker!.busySlots() === 0 ? true : undefined), 'the stale attempt to end');
  const after = await (await fetch(`${svc.baseUrl}/status/${id}`)).json();
  expect(after).toEqual(done);
  expect(Buffer.from(await (await fetch(`${svc.baseUrl}${done.result_url}`)).arrayBuffer()).equals(served)).toBe(true);
  const files = readdirSync(svc.config.MEDIA_DIR).filter((f) => !f.startsWith('.'));
  expect(files.sort()).toEqual([done.result_url!, (done.outputs[0] as { thumbnail_url?: string }).thumbnail_url!].map((u) => u.replace('/media/', '')).sort());
  expect(new Set(files.map((f) => tokenOf(`/${f}`)))).toEqual(new Set([tokenOf(done.result_url!)]));
  expect((await listAttempts(svc.db, id)).map((a) => [a.number, a.outcome])).toEqual([
    [1, 'interrupted'],
    [2, 'succeeded'],
  ]);
});

test('a job canceled after its outputs were written, before they were recorded, leaves no files behind', async () => {
  // The completion cannot commit (injected faults) until the cancel has landed: then it finds the job
  // canceled, and the attempt's files must go.
  const databaseUrl = await createTestDatabase();
  await injectFaults(databaseUrl, 'completed', 1_000_000);
  svc = await startTestService({ databaseUrl });
  const id = await jobIdOf(await submit(svc.baseUrl, { prompt: 'canceled late', parameters: { num_outputs: 3 } }));
  await waitFor(
    async () => (readdirSync(svc!.config.MEDIA_DIR).filter((f) => !f.startsWith('.')).length === 6 ? true : undefined),
    'the outputs to be written',
  );
  expect((await fetch(`${svc.baseUrl}/jobs/${id}/cancel`, { method: 'POST' })).status).toBe(200);
  await waitFor(async () => (svc!.worker!.busySlots() === 0 ? true : undefined), 'the attempt to end');
  expect(await waitForStatus(svc.baseUrl, id, ['canceled'])).toMatchObject({ status: 'canceled', outputs: [] });
  expect(readdirSync(svc.config.MEDIA_DIR)).toEqual([]);
  expect((await listAttempts(svc.db, id)).map((a) => a.outcome)).toEqual(['canceled']);
});

test('a cancel that arrives while the worker drains on shutdown still reaches the running job', async () => {
  const provider = gatedProvider({ honourAbort: true });
  const databaseUrl = await createTestDatabase();
  svc = await startTestService({ databaseUrl, provider, env: { SHUTDOWN_GRACE_SECONDS: '600' } });
  const id = await jobIdOf(await submit(svc.baseUrl, { prompt: 'canceled during shutdown' }));
  const [call] = await provider.started(1);
  const draining = svc.stop(); // waits for the running job (up to 10 minutes)
  const owner = svc;
  svc = undefined;
  await waitFor(async () => ((await fetch(`${owner.baseUrl}/healthz`).catch(() => undefined)) ? undefined : true), 'the draining API to close');
  const api = await startTestService({ databaseUrl, worker: false });
  extra.push(api);
  expect((await fetch(`${api.baseUrl}/jobs/${id}/cancel`, { method: 'POST' })).status).toBe(200);
  await draining; // ends as soon as the canceled job has stopped, long before the grace period
  expect(call.signal.aborted).toBe(true);
  expect((call.signal.reason as Error).message).toMatch(/canceled/);
  expect((await listAttempts(api.db, id)).map((a) => a.outcome)).toEqual(['canceled']);
});

describe('database hiccups cost no attempt', () => {
  test('a completion flush that fails is retried; the job completes on its first attempt', async () => {
    const databaseUrl = await createTestDatabase();
    await injectFaults(databaseUrl, 'completed', 3);
    svc = await startTestService({ databaseUrl });
    const ids = await Promise.all(['a', 'b', 'c'].map(async (p) => jobIdOf(await submit(svc!.baseUrl, { prompt: `flush ${p}` }))));
    for (const id of ids) {
      expect(await waitForStatus(svc.baseUrl, id, ['completed', 'failed'])).toMatchObject({ status: 'completed', attempts: 1 });
      expect((await listAttempts(svc.db, id)).map((a) => a.outcome)).toEqual(['succeeded']);
      expect(await retryCountOf(databaseUrl, id)).toBe(0);
    }
    // The faults did happen: all three were used up.
    expect(
      await withClient(databaseUrl, async (c) => (await c.query<{ n: string }>('select last_value as n from fault_completed')).rows[0].n),
    ).toBeGreaterThanOrEqual(3);
  });

  test('a failed attempt start is retried; a permanent failure then still fails at once (the content-policy flake)', async () => {
    const databaseUrl = await createTestDatabase();
    await injectFaults(databaseUrl, 'processing', 2);
    const { ProviderError } = await import('../src/providers/provider.ts');
    let calls = 0;
    const refusing: ImageProvider = {
      name: 'refusing',
      generate() {
        calls++;
        return Promise.reject(new ProviderError('permanent', 'All generated images contained NSFW content.'));
      },
    };
    svc = await startTestService({ databaseUrl, provider: refusing });
    const id = await jobIdOf(await submit(svc.baseUrl, { prompt: 'refused' }));
    expect(await waitForStatus(svc.baseUrl, id, ['completed', 'failed'])).toMatchObject({
      status: 'failed',
      attempts: 1,
      error: expect.stringMatching(/NSFW/),
    });
    expect(calls).toBe(1);
    expect(await retryCountOf(databaseUrl, id)).toBe(0);
  });
});

test('maintenance removes outputs no job will serve (a worker died after writing), and nothing else', async () => {
  svc = await startTestService();
  const id = await jobIdOf(await submit(svc.baseUrl, { prompt: 'kept' }));
  const done = await waitForStatus(svc.baseUrl, id, ['completed']);
  const dir = svc.config.MEDIA_DIR;
  const { createLocalStorage } = await import('../src/media/storage.ts');
  const { removeStrayOutputs } = await import('../src/worker/maintenance.handler.ts');
  const twoHoursAgo = new Date(Date.now() - 2 * 3600_000);
  const served = readdirSync(dir);
  const strayOfJob = `${id}-1-${'a'.repeat(32)}.png`; // an attempt that wrote but never completed the job
  const strayOfNobody = `00000000-0000-4000-8000-000000000000-1-${'b'.repeat(32)}.thumb.webp`;
  const young = `${id}-1-${'c'.repeat(32)}.png`; // may still be in the hands of a running attempt
  for (const name of [strayOfJob, strayOfNobody, young]) writeFileSync(path.join(dir, name), 'x');
  for (const name of [...served, strayOfJob, strayOfNobody]) utimesSync(path.join(dir, name), twoHoursAgo, twoHoursAgo);

  expect(await removeStrayOutputs(svc.db, await createLocalStorage(dir))).toBe(2);
  expect(readdirSync(dir).sort()).toEqual([...served, young].sort());
  expect((await fetch(`${svc.baseUrl}${done.result_url}`)).status).toBe(200);
});
