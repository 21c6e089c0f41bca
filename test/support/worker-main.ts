// A real worker process for tests that kill, signal or multiply workers. Same entrypoint code as
// src/main-worker.ts, with the local generator wrapped to record every provider call in the database.
import pg from 'pg';
import { runProcess } from '../../src/main-process.ts';
import { createLocalProvider } from '../../src/providers/local.provider.ts';
import type { ImageProvider } from '../../src/providers/provider.ts';

await runProcess({
  role: 'worker',
  database: async (config) => ({ url: config.DATABASE_URL! }),
  provider: (config, databaseUrl): ImageProvider => {
    const local = createLocalProvider({ latencyMs: config.LOCAL_PROVIDER_LATENCY_MS });
    const pool = new pg.Pool({ connectionString: databaseUrl, max: 4 });
    pool.on('error', () => {});
    return {
      name: 'local',
      async generate(request, signal, hooks) {
        await pool.query('insert into test_provider_calls (job_id, pid) values ($1, $2)', [request.jobId, process.pid]);
        process.send?.({ event: 'generate', jobId: request.jobId });
        return local.generate(request, signal, hooks);
      },
    };
  },
});
process.send?.({ event: 'ready' });
