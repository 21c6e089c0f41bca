import { dropTestDatabases, type TestPostgres } from './postgres.ts';

export default async function globalTeardown(): Promise<void> {
  const server = (globalThis as { __testPostgres?: TestPostgres }).__testPostgres;
  if (!server) return;
  // A server we were given (TEST_DATABASE_URL) gets its databases back; our own servers just stop.
  if (server.kind === 'url') await dropTestDatabases(server.adminUrl);
  await server.stop();
}
