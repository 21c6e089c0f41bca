// The worker's small concurrency helpers on their own: group commit (writes group while a flush runs, and a
// failed flush is never shared: each item is retried alone; a bad item fails alone; a transient error is
// retried) and the semaphore that bounds image work.
import { groupCommit } from '../src/worker/group-commit.ts';

class Transient extends Error {}
const options = { isTransient: (err: unknown) => err instanceof Transient, retryDelayMs: () => 1 };

test('writes asked for while a flush runs go into the next flush together', async () => {
  const flushes: number[][] = [];
  let release!: () => void;
  const first = new Promise<void>((r) => (release = r));
  const commit = groupCommit<number, number>(async (items) => {
    flushes.push(items);
    if (flushes.length === 1) await first;
    return items.map((i) => i * 10);
  }, options);
  const a = commit(1);
  const rest = [2, 3, 4].map((i) => commit(i));
  release();
  expect(await Promise.all([a, ...rest])).toEqual([10, 20, 30, 40]);
  expect(flushes).toEqual([[1], [2, 3, 4]]);
});

test('a bad item fails alone: the others of its flush still commit', async () => {
  const flushes: number[][] = [];
  let release!: () => void;
  const first = new Promise<void>((r) => (release = r));
  const commit = groupCommit<number, string>(async (items) => {
    flushes.push(items);
    if (flushes.length === 1) await first;
    if (items.includes(13)) throw new Error('constraint violated by 13');
    return items.map(String);
  }, options);
  const opener = commit(0);
  const results = Promise.allSettled([12, 13, 14].map((i) => commit(i)));
  release();
  await opener;
  expect((await results).map((r) => (r.status === 'fulfilled' ? r.value : (r.reason as Error).message))).toEqual(['12', 'constraint violated by 13', '14']);
  expect(flushes[1]).toEqual([12, 13, 14]); // they were grouped, then retried one by one
});

test('a transient failure is retried until the write lands', async () => {
  let failures = 3;
  let calls = 0;
  const commit = groupCommit<string, string>(async (items) => {
    calls++;
    if (failures-- > 0) throw new Transient('connection lost');
    return items.map((s) => s.toUpperCase());
  }, options);
  expect(await commit('x')).toBe('X');
  expect(calls).toBe(4);
});

test("retrying stops when the item's signal aborts", async () => {
  const commit = groupCommit<string, string>(() => Promise.reject(new Transient('database down')), options);
  const controller = new AbortController();
  const result = commit('x', controller.signal);
  controller.abort(new Error('the worker gave up'));
  await expect(result).rejects.toThrow('the worker gave up');
});

test('the image-work semaphore lets at most `limit` run at once, and every caller runs', async () => {
  const { createSemaphore } = await import('../src/worker/semaphore.ts');
  const semaphore = createSemaphore(3);
  let active = 0;
  let peak = 0;
  const results = await Promise.all(
    Array.from({ length: 20 }, (_, i) =>
      semaphore.run(async () => {
        peak = Math.max(peak, ++active);
        await new Promise((r) => setImmediate(r));
        active--;
        return i;
      }),
    ),
  );
  expect(results).toEqual(Array.from({ length: 20 }, (_, i) => i));
  expect(peak).toBe(3);
});
