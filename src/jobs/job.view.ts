// The public JSON of a job (the `/status` body), from its row.
import type { components } from '../http/api-types.ts';
import type { JobRow, Output } from './job.repository.ts';
import type { ResolvedParameters } from './parameters.ts';

export type JobStatusView = components['schemas']['JobStatus'];

/** The original's fields first (`job_id`, `status`, `result_url` | `error`), then ours. */
export function toStatusView(job: JobRow, live: { queuePosition?: number } = {}): JobStatusView {
  const outputs = job.outputs as unknown as Output[];
  const finished = job.status === 'completed' || job.status === 'failed' || job.status === 'canceled';
  return {
    job_id: job.id,
    status: job.status as JobStatusView['status'],
    ...(job.status === 'completed' && outputs.length > 0 ? { result_url: outputs[0].url } : {}),
    ...(job.status === 'failed' ? { error: job.error ?? 'failed' } : {}),
    prompt: job.prompt,
    parameters: job.parameters as unknown as ResolvedParameters,
    priority: job.priority,
    attempts: job.attempts,
    ...(live.queuePosition !== undefined && job.status === 'queued' ? { queue_position: live.queuePosition } : {}),
    ...(job.progress !== null && job.status === 'processing' ? { progress: job.progress } : {}),
    ...(job.last_error && !finished ? { last_error: job.last_error } : {}),
    outputs,
    provider: job.provider,
    ...(job.prediction_id ? { prediction_id: job.prediction_id } : {}),
    ...(job.webhook_url
      ? { webhook_url: job.webhook_url, webhook_events_filter: (job.webhook_events_filter ?? ['completed']) as JobStatusView['webhook_events_filter'] }
      : {}),
    created_at: job.created_at.toISOString(),
    updated_at: job.updated_at.toISOString(),
    ...(job.started_at ? { started_at: job.started_at.toISOString() } : {}),
    ...(job.finished_at ? { finished_at: job.finished_at.toISOString() } : {}),
  };
}
