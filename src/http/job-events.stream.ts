// GET /jobs/{id}/events: Server-Sent Events driven by the job_events table and its NOTIFY channel.
// Each stream replays what the client missed (Last-Event-ID) from the table, then follows
// notifications; queue positions come from QueuePositions, computed once for all watchers of a job.
import type { Request, Response } from 'express';
import type { Principal } from '../auth/principal.ts';
import type { Database } from '../db/database.ts';
import type { JobEventHub } from '../jobs/job.events.ts';
import { findJob, listJobEvents } from '../jobs/job.repository.ts';
import { getJob } from '../jobs/job.service.ts';
import { toStatusView } from '../jobs/job.view.ts';
import type { components } from './api-types.ts';
import type { QueuePositions } from './queue-positions.ts';

type JobEvent = components['schemas']['JobEvent'];

const TERMINAL = new Set(['completed', 'failed', 'canceled']);
const KEEPALIVE_MS = 15_000;

export interface StreamDeps {
  db: Database;
  events: JobEventHub;
  positions: QueuePositions;
  /** Open streams, so shutdown can end them instead of waiting for clients to leave. */
  streams: Set<Response>;
}

export async function streamJobEvents(deps: StreamDeps, principal: Principal, req: Request, res: Response): Promise<void> {
  const jobId = req.params.job_id as string;
  const job = await getJob(deps.db, principal, jobId); // 404 as problem+json before the stream starts
  let sentSeq = Number(req.header('last-event-id') ?? 0);
  // An id ahead of the job's history (stale or made up) means "I have everything so far": resume from
  // the job's latest event, or the catch-up below would never see the events still to come.
  if (sentSeq > 0 && (await listJobEvents(deps.db, jobId, sentSeq - 1)).length === 0) {
    sentSeq = (await listJobEvents(deps.db, jobId, 0)).at(-1)?.seq ?? 0;
  }
  let lastPosition: number | undefined;
  let position: number | undefined;
  let status = job.status;
  let ended = false;

  res.status(200).set({ 'Content-Type': 'text/event-stream', 'Cache-Control': 'no-cache, no-transform', 'X-Accel-Buffering': 'no' });
  res.flushHeaders();
  deps.streams.add(res);

  const send = (name: string, id: number, data: JobEvent) => {
    res.write(`event: ${name}\nid: ${id}\ndata: ${JSON.stringify(data)}\n\n`);
  };

  // One pump at a time: replay the table from sentSeq, then the position if it changed.
  let pumping: Promise<void> = Promise.resolve();
  let again = false;
  const pump = (): Promise<void> => {
    if (ended) return pumping;
    again = true;
    pumping = pumping.then(async () => {
      while (again && !ended) {
        again = false;
        await catchUp();
      }
    });
    pumping = pumping.catch((err) => {
      req.log.warn({ err }, 'event stream failed');
      end();
    });
    return pumping;
  };

  // The status of the last event sent (known from the table when resuming), to name the next one.
  let lastStatus: string | undefined;
  const catchUp = async () => {
    const events = await listJobEvents(deps.db, jobId, Math.max(0, sentSeq - 1));
    for (const event of events) {
      if (event.seq <= sentSeq) {
        lastStatus = status = event.status; // the event the client already has (maybe the terminal one)
        continue;
      }
      const kind = lastStatus === event.status ? 'progress' : 'status';
      lastStatus = status = event.status;
      const data: JobEvent = { job_id: jobId, seq: event.seq, status: event.status as JobEvent['status'], at: event.created_at.toISOString() };
      if (event.progress !== null) data.progress = event.progress;
      if (TERMINAL.has(event.status)) {
        const row = await findJob(deps.db, jobId);
        if (row) data.job = toStatusView(row);
      }
      send(kind, event.seq, data);
      sentSeq = event.seq;
      if (TERMINAL.has(event.status)) return end();
    }
    if (TERMINAL.has(status)) return end(); // the client already had the terminal event
    if (status === 'queued') {
      if (position !== undefined && position !== lastPosition) {
        lastPosition = position;
        send('position', sentSeq, { job_id: jobId, seq: sentSeq, status: 'queued', at: new Date().toISOString(), queue_position: position });
      }
    }
  };

  const offJob = deps.events.onJob(jobId, () => void pump());
  const offPosition = deps.positions.watch(jobId, (p) => {
    position = p;
    if (status === 'queued') void pump();
  });
  const offResync = deps.events.onResync(() => void pump());
  const keepalive = setInterval(() => res.write(': keepalive\n\n'), KEEPALIVE_MS);

  function end() {
    if (ended) return;
    ended = true;
    offJob();
    offPosition();
    offResync();
    clearInterval(keepalive);
    deps.streams.delete(res);
    res.end();
  }
  res.on('close', end);
  await pump();
}
