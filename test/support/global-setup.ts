// One Postgres server per test run, with a migrated template database each test file copies. Test
// workers inherit its URL, and the hosts the network guard must let them reach, through the environment.
import { ensurePgbouncer } from './pgbouncer.ts';
import { createTemplate, startTestPostgres } from './postgres.ts';

export default async function globalSetup(): Promise<void> {
  ensurePgbouncer(); // Debian's pgbouncer for test/pgbouncer.test.ts: installed here (apt-get, as root) when missing
  const server = await startTestPostgres();
  console.log(`\ntest Postgres: ${server.description}`);
  (globalThis as { __testPostgres?: unknown }).__testPostgres = server;
  await createTemplate(server.adminUrl);
  process.env.TEST_PG_ADMIN_URL = server.adminUrl;
  // Read by block-network.ts (not imported here: this process must stay free to reach a remote DOCKER_HOST).
  process.env.TEST_ALLOWED_HOSTS = server.hosts.join(',');
}
