// The worker's retry bookkeeping: retryable failures are retried with backoff and recorded, permanent
// ones fail at once, and a worker started later picks up what was queued.
import { listAttempts } from '../src/jobs/job.repository.ts';
import { createLocalProvider } from '../src/providers/local.provider.ts';
import { ProviderError, type ImageProvider } from '../src/providers/provider.ts';
import { withClient } from './support/postgres.ts';
import { createTestDatabase, startTestService, submit, waitForStatus, type TestService } from './support/harness.ts';

const local = createLocalProvider({ latencyMs: 0 });

/** A provider that throws the given errors in turn, then draws like the local one; counts calls per job. */
function scriptedProvider(errors: Error[]): ImageProvider & { calls: Map<string, number> } {
  const calls = new Map<string, number>();
  let next = 0;
  return {
    name: 'scripted',
    calls,
    async generate(request, signal) {
      calls.set(request.jobId, (calls.get(request.jobId) ?? 0) + 1);
      const error = errors[next++];
      if (error) throw error;
      return local.generate(request, signal);
    },
  };
}

async function jobId(res: Response): Promise<string> {
  expect(res.status).toBe(202);
  return ((await res.json()) as { job_id: string }).job_id;
}

describe('retries', () => {
  let svc: TestService | undefined;
  afterEach(async () => {
    await svc?.stop();
    svc = undefined;
  });

  test('a provider that fails twice then succeeds: attempt rows, backoff honoured, final success', async () => {
    const provider = scriptedProvider([new ProviderError('retryable', 'upstream 503 (first)'), new ProviderError('retryable', 'upstream 503 (second)')]);
    svc = await startTestService({ provider, env: { JOB_RETRY_DELAY_SECONDS: '1', JOB_RETRY_LIMIT: '5' } });
    const id = await jobId(await submit(svc.baseUrl, { prompt: 'flaky' }));
    const status = await waitForStatus(svc.baseUrl, id, ['completed', 'failed']);

    expect(status.status).toBe('completed');
    expect(status.attempts).toBe(3);
    expect(provider.calls.get(id)).toBe(3);

    const attempts = await listAttempts(svc.db, id);
    expect(attempts.map((a) => [a.number, a.outcome, a.error])).toEqual([
      [1, 'failed', 'upstream 503 (first)'],
      [2, 'failed', 'upstream 503 (second)'],
      [3, 'succeeded', null],
    ]);
    expect(attempts.map((a) => a.error_kind)).toEqual(['retryable', 'retryable', null]);
    // pg-boss backoff: retry k waits at least retryDelay * 2^(k-1) seconds (plus jitter, capped).
    for (const k of [1, 2]) {
      const waited = attempts[k].started_at.getTime() - attempts[k - 1].finished_at!.getTime();
      expect(waited).toBeGreaterThanOrEqual(1000 * 2 ** (k - 1) - 50);
    }
  });

  test('the backoff is capped by JOB_RETRY_DELAY_MAX_SECONDS and retries are limited by JOB_RETRY_LIMIT', async () => {
    const provider = scriptedProvider(Array.from({ length: 10 }, (_, i) => new ProviderError('retryable', `boom ${i + 1}`)));
    svc = await startTestService({ provider, env: { JOB_RETRY_DELAY_SECONDS: '1', JOB_RETRY_DELAY_MAX_SECONDS: '1', JOB_RETRY_LIMIT: '3' } });
    const id = await jobId(await submit(svc.baseUrl, { prompt: 'hopeless' }));
    const status = await waitForStatus(svc.baseUrl, id, ['completed', 'failed']);

    expect(status).toMatchObject({ status: 'failed', attempts: 4, error: 'gave up after 4 attempts: boom 4' });
    const attempts = await listAttempts(svc.db, id);
    expect(attempts).toHaveLength(4);
    expect(attempts.every((a) => a.outcome === 'failed')).toBe(true);
    for (let k = 1; k < attempts.length; k++) {
      const waited = attempts[k].started_at.getTime() - attempts[k - 1].finished_at!.getTime();
      // capped at 1 s, plus at most one polling interval (0.5 s) and scheduling slack
      expect(waited).toBeLessThan(1000 + 500 + 700);
    }
  });

  test('a permanent failure fails the job at once, with the error visible in /status', async () => {
    const provider = scriptedProvider([new ProviderError('permanent', 'All generated images contained NSFW content.')]);
    svc = await startTestService({ provider });
    const id = await jobId(await submit(svc.baseUrl, { prompt: 'refused' }));
    const status = await waitForStatus(svc.baseUrl, id, ['completed', 'failed']);

    expect(status).toMatchObject({ job_id: id, status: 'failed', error: 'All generated images contained NSFW content.', attempts: 1 });
    expect(provider.calls.get(id)).toBe(1);
    const attempts = await listAttempts(svc.db, id);
    expect(attempts.map((a) => [a.outcome, a.error_kind])).toEqual([['failed', 'permanent']]);
    // pg-boss has nothing left to do for it (no retry scheduled), and its output says why
    const queued = await withClient(
      svc.databaseUrl,
      async (c) => (await c.query('select state, retry_count, output from pgboss.job where id = $1', [id])).rows[0],
    );
    expect(queued).toMatchObject({
      state: 'completed',
      retry_count: 0,
      output: { outcome: 'failed', kind: 'permanent', error: 'All generated images contained NSFW content.' },
    });
  });

  test('a provider output that is not an image fails that attempt cleanly and is retried', async () => {
    let calls = 0;
    const provider: ImageProvider = {
      name: 'garbage-once',
      async generate(request, signal) {
        calls++;
        if (calls === 1) return { images: [{ data: Buffer.from('<html>definitely not an image</html>') }] };
        return local.generate(request, signal);
      },
    };
    svc = await startTestService({ provider });
    const id = await jobId(await submit(svc.baseUrl, { prompt: 'garbage first' }));
    const status = await waitForStatus(svc.baseUrl, id, ['completed', 'failed']);
    expect(status.status).toBe('completed');
    const attempts = await listAttempts(svc.db, id);
    expect(attempts[0]).toMatchObject({ outcome: 'failed', error_kind: 'retryable' });
    expect(attempts[0].error).toMatch(/output 1 of the provider is not a usable image/);
  });
});

describe('restarts', () => {
  test('jobs queued while no worker runs are picked up by a worker started later', async () => {
    const databaseUrl = await createTestDatabase();
    const api = await startTestService({ databaseUrl, worker: false });
    let worker: TestService | undefined;
    try {
      const ids = await Promise.all([1, 2, 3].map(async (n) => jobId(await submit(api.baseUrl, { prompt: `queued ${n}` }))));
      for (const id of ids) {
        const res = (await (await fetch(`${api.baseUrl}/status/${id}`)).json()) as { status: string };
        expect(res.status).toBe('queued');
      }
      worker = await startTestService({ databaseUrl, api: false, env: { MEDIA_DIR: api.config.MEDIA_DIR } });
      for (const id of ids) expect((await waitForStatus(api.baseUrl, id)).status).toBe('completed');
    } finally {
      await worker?.stop();
      await api.stop();
    }
  });

  test('the job row and its queue entry commit together', async () => {
    const databaseUrl = await createTestDatabase();
    const api = await startTestService({ databaseUrl, worker: false });
    try {
      const id = await jobId(await submit(api.baseUrl, { prompt: 'atomic' }));
      const rows = await withClient(
        databaseUrl,
        async (c) => (await c.query('select j.status, q.state, q.name from jobs j join pgboss.job q on q.id = j.id where j.id = $1', [id])).rows,
      );
      expect(rows).toEqual([{ status: 'queued', state: 'created', name: 'generate' }]);
      // and when the queue refuses the entry, no job row is left behind either
      await withClient(databaseUrl, async (c) => {
        const table = (await c.query("select table_name from pgboss.queue where name = 'generate'")).rows[0].table_name;
        await c.query("create function refuse() returns trigger language plpgsql as $$ begin raise exception 'queue refuses'; end $$");
        await c.query(`create trigger refuse before insert on pgboss.${table} for each row execute function refuse()`);
      });
      const res = await submit(api.baseUrl, { prompt: 'cannot enqueue' });
      expect(res.status).toBe(500);
      const count = await withClient(
        databaseUrl,
        async (c) => (await c.query("select count(*)::int as n from jobs where prompt = 'cannot enqueue'")).rows[0].n,
      );
      expect(count).toBe(0);
    } finally {
      await api.stop();
    }
  });
});
