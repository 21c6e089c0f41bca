// Listens to the `job_events` channel (NOTIFY from the jobs table trigger) on one dedicated connection
// per process, and fans the notifications out to in-process subscribers (SSE streams, the worker's
// wake-ups and cancellation). The connection is pinged: a half-open socket (no error, no data) would
// otherwise lose notifications silently. Reconnects on its own; subscribers are told to re-read state
// after a reconnect.
import { EventEmitter } from 'node:events';
import pg from 'pg';
import type { Logger } from '../logger.ts';

export interface JobNotification {
  job_id: string;
  seq: number;
  status: string;
}

export interface JobEventHub {
  /** Every notification, for every job. */
  onAny(listener: (n: JobNotification) => void): () => void;
  /** Notifications of one job. */
  onJob(jobId: string, listener: (n: JobNotification) => void): () => void;
  /** Called after the listener reconnected: notifications may have been missed meanwhile. */
  onResync(listener: () => void): () => void;
  close(): Promise<void>;
}

export const CHANNEL = 'job_events';

export interface HubOptions {
  /** How often the listening connection is checked (default 10 s). */
  pingIntervalMs?: number;
  /** How long a check may take before the connection is taken for dead (default 5 s). */
  pingTimeoutMs?: number;
}

export async function createJobEventHub(databaseUrl: string, logger: Logger, options: HubOptions = {}): Promise<JobEventHub> {
  const emitter = new EventEmitter();
  emitter.setMaxListeners(0);
  let client: pg.Client | undefined;
  let closed = false;
  let retryMs = 100;
  const pingIntervalMs = options.pingIntervalMs ?? 10_000;
  const pingTimeoutMs = options.pingTimeoutMs ?? 5_000;

  const connect = async (): Promise<void> => {
    const c = new pg.Client({ connectionString: databaseUrl, application_name: 'media-gen:events', keepAlive: true });
    c.on('notification', (msg) => {
      if (!msg.payload) return;
      try {
        const n = JSON.parse(msg.payload) as JobNotification;
        emitter.emit('any', n);
        emitter.emit(`job:${n.job_id}`, n);
      } catch (err) {
        logger.warn({ err }, 'unreadable job notification');
      }
    });
    c.on('error', (err) => {
      logger.warn({ err }, 'job event listener lost its connection');
      void reconnect(c);
    });
    c.on('end', () => void reconnect(c));
    await c.connect();
    await c.query(`LISTEN ${CHANNEL}`);
    client = c;
    retryMs = 100;
  };

  const reconnect = async (dead: pg.Client): Promise<void> => {
    if (closed || client !== dead) return;
    client = undefined;
    dead.removeAllListeners('end');
    dead.on('error', () => {}); // late errors of the dead connection
    // Not awaited: on a half-open socket a clean end never completes. The socket is destroyed instead.
    void dead.end().catch(() => {});
    socketOf(dead)?.destroy();
    // eslint-disable-next-line @typescript-eslint/no-unnecessary-condition -- close() sets it while we wait
    while (!closed) {
      await new Promise((r) => setTimeout(r, retryMs).unref());
      retryMs = Math.min(retryMs * 2, 5_000);
      try {
        await connect();
        logger.info('job event listener reconnected');
        emitter.emit('resync');
        return;
      } catch (err) {
        logger.debug({ err }, 'job event listener still cannot connect');
      }
    }
  };

  await connect();

  // The check: a query on the listening connection must come back within pingTimeoutMs.
  let pinging = false;
  const ping = setInterval(() => {
    const c = client;
    if (!c || pinging || closed) return;
    pinging = true;
    let timer: NodeJS.Timeout | undefined;
    const timeout = new Promise<never>((_, reject) => {
      timer = setTimeout(() => reject(new Error(`no answer within ${pingTimeoutMs} ms`)), pingTimeoutMs);
    });
    Promise.race([c.query('SELECT 1'), timeout])
      .catch((err: unknown) => {
        if (client !== c) return;
        logger.warn({ err }, 'job event listener stopped answering; reconnecting');
        void reconnect(c);
      })
      .finally(() => {
        clearTimeout(timer);
        pinging = false;
      });
  }, pingIntervalMs);
  ping.unref();

  const on = (event: string, listener: Parameters<EventEmitter['on']>[1]) => {
    emitter.on(event, listener);
    return () => void emitter.off(event, listener);
  };
  return {
    onAny: (listener) => on('any', listener),
    onJob: (jobId, listener) => on(`job:${jobId}`, listener),
    onResync: (listener) => on('resync', listener),
    async close() {
      closed = true;
      clearInterval(ping);
      const c = client;
      client = undefined;
      if (c) {
        c.removeAllListeners('end');
        c.on('error', () => {});
        // A clean end, unless the connection is half-open: then it would never complete.
        await Promise.race([c.end().catch(() => {}), new Promise((r) => setTimeout(r, pingTimeoutMs).unref())]);
        socketOf(c)?.destroy();
      }
    },
  };
}

/** The socket under a pg client (not in its public types). */
function socketOf(c: pg.Client): { destroy(): void } | undefined {
  return (c as unknown as { connection?: { stream?: { destroy(): void } } }).connection?.stream;
}
