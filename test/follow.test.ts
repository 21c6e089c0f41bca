// Following and steering jobs, through the typed client generated from openapi.yaml: listing, cancel,
// queue position and progress, live events, priority, thumbnails and metrics.
import { createMediaClient, type JobEvent, type MediaClient } from '../src/client/index.ts';
import { listAttempts } from '../src/jobs/job.repository.ts';
import { probeImage } from '../src/media/normalize.ts';
import { createLocalProvider } from '../src/providers/local.provider.ts';
import type { ImageProvider } from '../src/providers/provider.ts';
import { withClient } from './support/postgres.ts';
import { mediaPath } from './support/media-names.ts';
import { openSse } from './support/sse.ts';
import { createTestDatabase, startTestService, waitFor, waitForStatus, type TestService } from './support/harness.ts';

const services: TestService[] = [];
afterEach(async () => {
  for (const s of services.splice(0)) await s.stop();
});

async function start(options: Parameters<typeof startTestService>[0] = {}): Promise<{ svc: TestService; api: MediaClient }> {
  const svc = await startTestService(options);
  services.push(svc);
  return { svc, api: createMediaClient(svc.baseUrl) };
}

async function submit(api: MediaClient, prompt: string, extra: Record<string, unknown> = {}): Promise<string> {
  const { data, response } = await api.POST('/generate', { body: { prompt, parameters: { width: 64, height: 64 }, ...extra } });
  expect(response.status).toBe(202);
  return data!.job_id;
}

/** A local generator whose calls can be held open until released (or aborted). */
function gatedProvider(): ImageProvider & { started: string[]; aborted: string[]; release(): void } {
  const local = createLocalProvider({ latencyMs: 0 });
  let open!: () => void;
  const gate = new Promise<void>((r) => (open = r));
  const state = {
    name: 'gated',
    started: [] as string[],
    aborted: [] as string[],
    release: () => open(),
    async generate(request: Parameters<ImageProvider['generate']>[0], signal: AbortSignal) {
      state.started.push(request.jobId);
      await new Promise<void>((resolve, reject) => {
        signal.addEventListener('abort', () => {
          state.aborted.push(request.jobId);
          reject(signal.reason);
        });
        void gate.then(resolve);
      });
      return local.generate(request, signal);
    },
  };
  return state;
}

describe('GET /jobs', () => {
  test('lists newest first, filters by status and time, and pages with a cursor', async () => {
    const { svc, api } = await start({ worker: false });
    const ids: string[] = [];
    for (let i = 0; i < 5; i++) ids.push(await submit(api, `listed ${i}`));
    await withClient(svc.databaseUrl, (c) => c.query("update jobs set status = 'failed', error = 'x' where id = any($1)", [[ids[1], ids[3]]]));

    const all = await api.GET('/jobs', { params: { query: { limit: 100 } } });
    expect(all.data!.jobs.map((j) => j.job_id)).toEqual([...ids].reverse());
    expect(all.data!.next_cursor).toBeUndefined();

    const failed = await api.GET('/jobs', { params: { query: { status: ['failed'] } } });
    expect(failed.data!.jobs.map((j) => j.job_id)).toEqual([ids[3], ids[1]]);
    const either = await api.GET('/jobs', { params: { query: { status: ['failed', 'queued'], limit: 100 } } });
    expect(either.data!.jobs).toHaveLength(5);

    const seen: string[] = [];
    let cursor: string | undefined;
    do {
      const page = await api.GET('/jobs', { params: { query: { limit: 2, ...(cursor ? { cursor } : {}) } } });
      expect(page.data!.jobs.length).toBeLessThanOrEqual(2);
      seen.push(...page.data!.jobs.map((j) => j.job_id));
      cursor = page.data!.next_cursor;
    } while (cursor);
    expect(seen).toEqual([...ids].reverse());

    const third = (await api.GET('/status/{job_id}', { params: { path: { job_id: ids[2] } } })).data!;
    const after = await api.GET('/jobs', { params: { query: { created_after: third.created_at } } });
    expect(after.data!.jobs.map((j) => j.job_id)).toEqual([ids[4], ids[3]]);
    const before = await api.GET('/jobs', { params: { query: { created_before: third.created_at } } });
    expect(before.data!.jobs.map((j) => j.job_id)).toEqual([ids[1], ids[0]]);
  });

  test('bad filters are 400 problems naming the parameter', async () => {
    const { svc } = await start({ worker: false });
    for (const [query, name] of [
      ['status=done', 'status'],
      ['limit=0', 'limit'],
      ['created_after=yesterday', 'created_after'],
      ['cursor=bm90LWEtY3Vyc29y', 'cursor'],
      ['colour=red', 'colour'],
    ]) {
      const res = await fetch(`${svc.baseUrl}/jobs?${query}`);
      expect(res.status).toBe(400);
      expect(res.headers.get('content-type')).toMatch(/problem\+json/);
      expect(JSON.stringify(await res.json())).toContain(name);
    }
  });
});

describe('cancel', () => {
  test('a queued job never starts', async () => {
    const databaseUrl = await createTestDatabase();
    const { api } = await start({ databaseUrl, worker: false });
    const id = await submit(api, 'never');
    const res = await api.POST('/jobs/{job_id}/cancel', { params: { path: { job_id: id } } });
    expect(res.response.status).toBe(200);
    expect(res.data).toMatchObject({ job_id: id, status: 'canceled' });
    const state = await withClient(databaseUrl, async (c) => (await c.query('select state from pgboss.job where id = $1', [id])).rows[0].state);
    expect(state).toBe('cancelled');

    const provider = gatedProvider();
    provider.release();
    const { svc: worker } = await start({ databaseUrl, api: false, provider });
    const later = await submit(api, 'after the cancel'); // proves the worker is running
    await waitForStatus(`http://127.0.0.1:${services[0].port}`, later, ['completed']);
    expect(provider.started).toEqual([later]);
    expect((await listAttempts(worker.db, id)).length).toBe(0);
  });

  test('a running job is aborted and ends canceled; its attempt says so', async () => {
    const provider = gatedProvider();
    const { svc, api } = await start({ provider });
    const id = await submit(api, 'stop me');
    await waitFor(async () => (provider.started.includes(id) ? true : undefined), 'the job to start');
    const res = await api.POST('/jobs/{job_id}/cancel', { params: { path: { job_id: id } } });
    expect(res.data).toMatchObject({ status: 'canceled' });
    await waitFor(async () => (provider.aborted.includes(id) ? true : undefined), 'the provider call to be aborted');
    const attempts = await waitFor(async () => {
      const rows = await listAttempts(svc.db, id);
      return rows[0]?.outcome === 'canceled' ? rows : undefined;
    }, 'the attempt to be marked canceled');
    expect(attempts).toHaveLength(1);
    expect((await api.GET('/status/{job_id}', { params: { path: { job_id: id } } })).data).toMatchObject({ status: 'canceled', outputs: [] });
  });

  test('a finished job is answered 409 with its state unchanged', async () => {
    const { api } = await start();
    const id = await submit(api, 'done already');
    const done = await waitForStatus(services[0].baseUrl, id, ['completed']);
    const res = await api.POST('/jobs/{job_id}/cancel', { params: { path: { job_id: id } } });
    expect(res.response.status).toBe(409);
    expect(res.response.headers.get('content-type')).toMatch(/problem\+json/);
    expect(res.error).toMatchObject({ status: 409, job: { job_id: id, status: 'completed', result_url: done.result_url } });
    expect((await api.GET('/status/{job_id}', { params: { path: { job_id: id } } })).data!.status).toBe('completed');
    const missing = await api.POST('/jobs/{job_id}/cancel', { params: { path: { job_id: '00000000-0000-4000-8000-000000000000' } } });
    expect(missing.response.status).toBe(404);
  });
});

describe('queue position, priority and progress', () => {
  test('queued jobs show their position; a higher priority goes ahead', async () => {
    const { api } = await start({ worker: false });
    const a = await submit(api, 'first');
    const b = await submit(api, 'second');
    const urgent = await submit(api, 'urgent', { priority: 10 });
    const position = async (id: string) => (await api.GET('/status/{job_id}', { params: { path: { job_id: id } } })).data!.queue_position;
    expect([await position(urgent), await position(a), await position(b)]).toEqual([1, 2, 3]);
    await api.POST('/jobs/{job_id}/cancel', { params: { path: { job_id: urgent } } });
    expect([await position(a), await position(b), await position(urgent)]).toEqual([1, 2, undefined]);
  });

  test('the worker runs higher priorities first', async () => {
    const databaseUrl = await createTestDatabase();
    const { api } = await start({ databaseUrl, worker: false });
    const low = [await submit(api, 'low 1'), await submit(api, 'low 2')];
    const high = await submit(api, 'high', { priority: 50 });
    const order: string[] = [];
    const local = createLocalProvider({ latencyMs: 0 });
    const recording: ImageProvider = { name: 'local', generate: (req, signal) => (order.push(req.jobId), local.generate(req, signal)) };
    await start({ databaseUrl, api: false, provider: recording, env: { WORKER_CONCURRENCY: '1', WORKER_BATCH_SIZE: '1' } });
    for (const id of [...low, high]) await waitForStatus(services[0].baseUrl, id, ['completed']);
    expect(order[0]).toBe(high);
  });

  test('progress reported by the generator shows while processing', async () => {
    const provider = gatedProvider();
    const progressing: ImageProvider = {
      name: 'progressing',
      async generate(request, signal, hooks) {
        hooks?.onProgress?.(0.4);
        return provider.generate(request, signal);
      },
    };
    const { api } = await start({ provider: progressing });
    const id = await submit(api, 'slowly');
    const seen = await waitFor(async () => {
      const s = (await api.GET('/status/{job_id}', { params: { path: { job_id: id } } })).data!;
      return s.progress !== undefined ? s : undefined;
    }, 'progress in /status');
    expect(seen).toMatchObject({ status: 'processing', progress: expect.closeTo(0.4, 5), started_at: expect.any(String) });
    provider.release();
    const done = await waitForStatus(services[0].baseUrl, id, ['completed']);
    expect(done).not.toHaveProperty('progress');
    expect(Date.parse(done.finished_at as string)).toBeGreaterThanOrEqual(Date.parse(done.started_at as string));
  });
});

describe('GET /jobs/{id}/events', () => {
  test('streams each change and ends with the terminal event; a reconnect resumes after Last-Event-ID', async () => {
    // the local generator reports 25% steps; progress is written at most once a second
    const { svc, api } = await start({ env: { LOCAL_PROVIDER_LATENCY_MS: '2400' } });
    const id = await submit(api, 'streamed');
    const stream = await openSse(`${svc.baseUrl}/jobs/${id}/events`);
    expect(stream.status).toBe(200);
    expect(stream.contentType).toMatch(/^text\/event-stream/);
    await stream.ended;
    const events = stream.events.filter((e) => e.event !== 'position');
    const data = events.map((e) => e.data as JobEvent);
    expect(events[0]).toMatchObject({ event: 'status', id: '1', data: { status: 'queued', seq: 1 } });
    expect(events[1]).toMatchObject({ event: 'status', data: { status: 'processing' } });
    const progress = events.filter((e) => e.event === 'progress').map((e) => (e.data as JobEvent).progress!);
    expect(progress.length).toBeGreaterThanOrEqual(2);
    expect(progress[0]).toBe(0.25);
    expect(progress).toEqual([...progress].sort());
    expect(progress.every((p) => p > 0 && p < 1)).toBe(true);
    expect(new Set(progress).size).toBe(progress.length);
    const last = events.at(-1)!;
    expect(last).toMatchObject({
      event: 'status',
      data: { status: 'completed', job: { job_id: id, status: 'completed', result_url: expect.stringMatching(mediaPath(id, 1, 'png')) } },
    });
    expect(data.map((d) => d.seq)).toEqual(data.map((_, i) => i + 1)); // every change, in order, once

    const resumed = await openSse(`${svc.baseUrl}/jobs/${id}/events`, { 'last-event-id': '2' });
    await resumed.ended;
    expect(resumed.events.map((e) => e.id)).toEqual(events.slice(2).map((e) => e.id));
  });

  test('a queued job streams its position as jobs ahead leave the queue', async () => {
    const { svc, api } = await start({ worker: false });
    const ahead = await submit(api, 'ahead');
    const id = await submit(api, 'behind');
    const stream = await openSse(`${svc.baseUrl}/jobs/${id}/events`);
    const [first, second] = await stream.next(2);
    expect(first).toMatchObject({ event: 'status', data: { status: 'queued' } });
    expect(second).toMatchObject({ event: 'position', id: '1', data: { queue_position: 2 } });
    await api.POST('/jobs/{job_id}/cancel', { params: { path: { job_id: ahead } } });
    const [, , third] = await stream.next(3);
    expect(third).toMatchObject({ event: 'position', data: { queue_position: 1 } });
    await api.POST('/jobs/{job_id}/cancel', { params: { path: { job_id: id } } });
    await stream.ended;
    expect(stream.events.at(-1)).toMatchObject({ event: 'status', data: { status: 'canceled' } });
  });

  test('an unknown job is a 404 problem, not a stream', async () => {
    const { svc } = await start({ worker: false });
    const res = await fetch(`${svc.baseUrl}/jobs/00000000-0000-4000-8000-000000000000/events`);
    expect(res.status).toBe(404);
    expect(res.headers.get('content-type')).toMatch(/problem\+json/);
  });
});

describe('outputs and metrics', () => {
  test('every output has a WebP thumbnail', async () => {
    const { svc, api } = await start();
    const { data } = await api.POST('/generate', { body: { prompt: 'thumbs', parameters: { width: 1024, height: 512, num_outputs: 2 } } });
    const done = await waitForStatus(svc.baseUrl, data!.job_id, ['completed']);
    const thumbs = done.outputs.map((o) => (o as { thumbnail_url?: string }).thumbnail_url);
    expect(thumbs).toEqual([
      expect.stringMatching(mediaPath(data!.job_id, 1, 'thumb.webp')),
      expect.stringMatching(mediaPath(data!.job_id, 1, 'thumb.webp', 1)),
    ]);
    expect(thumbs[0]).toBe(done.outputs[0].url.replace(/\.png$/, '.thumb.webp'));
    const thumb = await fetch(`${svc.baseUrl}${thumbs[0]}`);
    expect(thumb.headers.get('content-type')).toBe('image/webp');
    expect(await probeImage(Buffer.from(await thumb.arrayBuffer()))).toEqual({ width: 256, height: 128, format: 'webp' });
  });

  test('GET /metrics exposes jobs by status, queue depth, pickup latency, durations, errors and retries', async () => {
    const { svc, api } = await start();
    await waitForStatus(svc.baseUrl, await submit(api, 'measured'), ['completed']);
    // The worker records its histograms just after the completion commits: a poll may see the job first.
    const text = await waitFor(async () => {
      const res = await fetch(`${svc.baseUrl}/metrics`);
      expect(res.headers.get('content-type')).toMatch(/^text\/plain/);
      const body = await res.text();
      return /^media_job_duration_seconds_count\{status="completed"\} 1$/m.test(body) ? body : undefined;
    }, 'the worker to record the completed job');
    expect(text).toMatch(/^media_jobs\{status="completed"\} 1$/m);
    expect(text).toMatch(/^media_queue_depth\{state="ready"\} \d+$/m);
    expect(text).toMatch(/^media_job_pickup_seconds_count 1$/m);
    expect(text).toMatch(/^media_job_duration_seconds_count\{status="completed"\} 1$/m);
    expect(text).toMatch(/^media_provider_duration_seconds_count\{provider="local",outcome="succeeded"\} 1$/m);
    expect(text).toMatch(/^# TYPE media_provider_errors_total counter$/m);
    expect(text).toMatch(/^# TYPE media_job_retries_total counter$/m);
    expect(text).toMatch(/^# TYPE media_webhook_deliveries_total counter$/m);
  });
});
