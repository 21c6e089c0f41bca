// Prometheus metrics: one registry per service instance (so tests can run several in one process).
// Counters and histograms are this process's; job and queue gauges are read from the database at scrape.
import { Counter, Gauge, Histogram, Registry, collectDefaultMetrics } from 'prom-client';
import type { PgBoss } from 'pg-boss';
import type { Database } from './db/database.ts';
import { countJobsByStatus } from './jobs/job.repository.ts';
import { GENERATE } from './queue/queue.ts';

export interface Metrics {
  registry: Registry;
  pickupSeconds: Histogram;
  jobSeconds: Histogram<'status'>;
  providerSeconds: Histogram<'provider' | 'outcome'>;
  providerErrors: Counter<'provider' | 'kind'>;
  retries: Counter;
  jobsFinished: Counter<'status'>;
  webhookDeliveries: Counter<'outcome'>;
}

const latencyBuckets = [0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30];
const durationBuckets = [0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600];

export function createMetrics(): Metrics {
  const registry = new Registry();
  collectDefaultMetrics({ register: registry, prefix: 'media_' });
  return {
    registry,
    pickupSeconds: new Histogram({
      name: 'media_job_pickup_seconds',
      help: 'Time from submission to the first attempt starting',
      buckets: latencyBuckets,
      registers: [registry],
    }),
    jobSeconds: new Histogram({
      name: 'media_job_duration_seconds',
      help: 'Time from the first attempt starting to the job finishing',
      labelNames: ['status'],
      buckets: durationBuckets,
      registers: [registry],
    }),
    providerSeconds: new Histogram({
      name: 'media_provider_duration_seconds',
      help: 'Time one provider call took',
      labelNames: ['provider', 'outcome'],
      buckets: durationBuckets,
      registers: [registry],
    }),
    providerErrors: new Counter({
      name: 'media_provider_errors_total',
      help: 'Failed attempts by provider and kind (retryable, permanent, aborted, internal)',
      labelNames: ['provider', 'kind'],
      registers: [registry],
    }),
    retries: new Counter({ name: 'media_job_retries_total', help: 'Attempts that were retries of an earlier one', registers: [registry] }),
    jobsFinished: new Counter({
      name: 'media_jobs_finished_total',
      help: 'Jobs this process finished, by final status',
      labelNames: ['status'],
      registers: [registry],
    }),
    webhookDeliveries: new Counter({
      name: 'media_webhook_deliveries_total',
      help: 'Webhook delivery calls by outcome (delivered, failed, refused, deferred, skipped)',
      labelNames: ['outcome'],
      registers: [registry],
    }),
  };
}

/** Gauges read from the database when scraped: jobs by status and the queue's depth. */
export function registerDatabaseGauges(metrics: Metrics, db: Database, boss: PgBoss): void {
  new Gauge({
    name: 'media_jobs',
    help: 'Jobs by status (all processes)',
    labelNames: ['status'],
    registers: [metrics.registry],
    async collect() {
      // Kept by triggers on the jobs table: a scrape reads a few rows, however long the history.
      const counts = await countJobsByStatus(db);
      this.reset();
      for (const [status, n] of Object.entries(counts)) this.set({ status }, n);
    },
  });
  new Gauge({
    name: 'media_queue_depth',
    help: 'Generate jobs in the queue by state (ready, deferred = waiting for a retry, active)',
    labelNames: ['state'],
    registers: [metrics.registry],
    async collect() {
      const queue = await boss.getQueue(GENERATE);
      this.set({ state: 'ready' }, queue?.readyCount ?? 0);
      this.set({ state: 'deferred' }, queue?.deferredCount ?? 0);
      this.set({ state: 'active' }, queue?.activeCount ?? 0);
    },
  });
}
