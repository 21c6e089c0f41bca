// GET /jobs/{id}/events with a Last-Event-ID the job has not reached yet (a stale or made-up id), while
// the job runs: the stream must still end when the job does (it used to send keep-alives forever).
import { createLocalProvider } from '../src/providers/local.provider.ts';
import type { ImageProvider } from '../src/providers/provider.ts';
import { openSse } from './support/sse.ts';
import { startTestService, submit, waitForStatus, type TestService } from './support/harness.ts';

let svc: TestService;
afterEach(async () => {
  await svc?.stop();
});

/** The local generator, held until released. */
function heldProvider(): ImageProvider & { release(): void } {
  const local = createLocalProvider({ latencyMs: 0 });
  let open!: () => void;
  const gate = new Promise<void>((r) => (open = r));
  return {
    name: 'held',
    release: () => open(),
    async generate(request, signal, hooks) {
      await gate;
      return local.generate(request, signal, hooks);
    },
  };
}

async function runningJob(): Promise<{ id: string; provider: ReturnType<typeof heldProvider> }> {
  const provider = heldProvider();
  svc = await startTestService({ provider });
  const res = await submit(svc.baseUrl, { prompt: 'resumed ahead', parameters: { width: 64, height: 64 } });
  const { job_id: id } = (await res.json()) as { job_id: string };
  await waitForStatus(svc.baseUrl, id, ['processing']); // events so far: 1 queued, 2 processing
  return { id, provider };
}

test.each([
  ['one ahead: the terminal event will have exactly this id', '3'],
  ['far ahead: an id the job never reaches', '999'],
])('Last-Event-ID %s: the stream ends with the job, carrying the terminal status', async (_name, lastEventId) => {
  const { id, provider } = await runningJob();
  const stream = await openSse(`${svc.baseUrl}/jobs/${id}/events`, { 'last-event-id': lastEventId });
  expect(stream.status).toBe(200);
  provider.release();
  const done = await waitForStatus(svc.baseUrl, id, ['completed']);
  await stream.ended; // never resolved before the fix
  const statuses = stream.events.filter((e) => e.event === 'status').map((e) => (e.data as { status: string }).status);
  expect(statuses).toEqual(['completed']);
  expect(stream.events.at(-1)!.data).toMatchObject({ status: 'completed', job: { job_id: id, result_url: done.result_url } });
});
