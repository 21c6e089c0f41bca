// Production entrypoint: the worker only, against DATABASE_URL. Scale by running more of them.
import { requireDatabaseUrl, runProcess } from './main-process.ts';

await runProcess({ role: 'worker', database: (config) => Promise.resolve(requireDatabaseUrl(config)) });
