// One Postgres server per test run, with a migrated template database each test file copies.
import { createTemplate, startTestPostgres } from './postgres.ts';

export default async function globalSetup(): Promise<void> {
  const server = await startTestPostgres();
  await createTemplate(server.adminUrl);
  process.env.TEST_PG_ADMIN_URL = server.adminUrl;
  (globalThis as { __testPostgres?: unknown }).__testPostgres = server;
  console.log(`\ntest Postgres: ${server.kind}`);
}
