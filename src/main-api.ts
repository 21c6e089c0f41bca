// Production entrypoint: the HTTP API only, against DATABASE_URL.
import { requireDatabaseUrl, runProcess } from './main-process.ts';

await runProcess({ role: 'api', database: (config) => Promise.resolve(requireDatabaseUrl(config)) });
