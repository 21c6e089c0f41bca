// The LISTEN connection behind SSE streams and worker cancellation: a half-open socket (no error, no
// data, as after a silent network partition) is found by the hub's check and replaced, followed by a
// resync, instead of losing notifications for good.
import net from 'node:net';
import { createJobEventHub, type JobEventHub, type JobNotification } from '../src/jobs/job.events.ts';
import { createLogger } from '../src/logger.ts';
import { createTestDatabase, waitFor } from './support/harness.ts';
import { withClient } from './support/postgres.ts';

/** A TCP proxy to Postgres whose existing connections can be frozen: open, but nothing passes. */
async function startFreezableProxy(databaseUrl: string) {
  const target = new URL(databaseUrl);
  const live: { client: net.Socket; upstream: net.Socket }[] = [];
  const all: net.Socket[] = [];
  const server = net.createServer((client) => {
    const upstream = net.connect(Number(target.port), target.hostname);
    client.pipe(upstream);
    upstream.pipe(client);
    const destroy = () => {
      client.destroy();
      upstream.destroy();
    };
    client.on('error', destroy);
    upstream.on('error', destroy);
    live.push({ client, upstream });
    all.push(client, upstream);
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const url = new URL(databaseUrl);
  url.hostname = '127.0.0.1';
  url.port = String((server.address() as net.AddressInfo).port);
  return {
    url: url.toString(),
    /** Every connection made so far stops passing data in both directions, without closing. */
    freeze() {
      for (const { client, upstream } of live.splice(0)) {
        client.unpipe(upstream);
        upstream.unpipe(client);
        client.pause();
        upstream.pause();
      }
    },
    close: () =>
      new Promise<void>((resolve) => {
        server.close(() => resolve());
        for (const socket of all) socket.destroy();
      }),
  };
}

let hub: JobEventHub | undefined;
afterEach(async () => {
  await hub?.close();
  hub = undefined;
});

test('a listener whose connection went silent is replaced, and subscribers are told to resync', async () => {
  const databaseUrl = await createTestDatabase();
  const proxy = await startFreezableProxy(databaseUrl);
  const notify = (jobId: string) =>
    withClient(databaseUrl, (c) =>
      c.query(`select pg_notify('job_events', json_build_object('job_id', $1::text, 'seq', 1, 'status', 'canceled')::text)`, [jobId]),
    );
  hub = await createJobEventHub(proxy.url, createLogger('silent'), { pingIntervalMs: 100, pingTimeoutMs: 300 });
  const seen: JobNotification[] = [];
  hub.onAny((n) => seen.push(n));
  let resyncs = 0;
  hub.onResync(() => resyncs++);

  await notify('before');
  await waitFor(async () => (seen.some((n) => n.job_id === 'before') ? true : undefined), 'a notification on the healthy connection');

  proxy.freeze();
  await notify('while-frozen'); // lost on the frozen connection: that is what a half-open socket does
  await waitFor(async () => (resyncs > 0 ? true : undefined), 'the hub to notice and reconnect');
  await notify('after');
  await waitFor(async () => (seen.some((n) => n.job_id === 'after') ? true : undefined), 'notifications on the new connection');
  expect(seen.map((n) => n.job_id)).not.toContain('while-frozen');
  await proxy.close();
});
