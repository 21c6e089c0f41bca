// Tests may only talk to this machine and to the test database the harness chose: global-setup.ts names
// that server's host (and the container runtime's host Testcontainers reports) in TEST_ALLOWED_HOSTS,
// which every test worker inherits. Any other connection fails at once.
import net from 'node:net';

export const ALLOWED_HOSTS_ENV = 'TEST_ALLOWED_HOSTS';

const isLoopback = (host: string) => host === 'localhost' || host === '::1' || host.startsWith('127.') || host === '::ffff:127.0.0.1';

/** Hosts the harness allows beyond loopback, from TEST_ALLOWED_HOSTS (comma-separated). */
export function allowedHosts(env: NodeJS.ProcessEnv = process.env): string[] {
  return (env[ALLOWED_HOSTS_ENV] ?? '')
    .split(',')
    .map((h) => h.trim().toLowerCase())
    .filter(Boolean);
}

/** Whether a test may connect to `host` (undefined: the default, localhost): loopback, or exactly one of `allowed`. */
export function mayConnect(host: string | undefined, allowed: readonly string[]): boolean {
  if (host === undefined) return true;
  const h = host.toLowerCase().replace(/^\[(.*)\]$/, '$1');
  return isLoopback(h) || h.startsWith('/') || allowed.includes(h); // '/...': a unix socket directory
}

// Jest runs this once per test file in the same worker process, each time with that file's own copy of
// process.env: each run replaces the previous guard (wrapping the original connect) rather than stacking.
type Connect = (this: net.Socket, ...args: unknown[]) => net.Socket;
const socket = net.Socket.prototype as unknown as { connect: Connect; unguardedConnect?: Connect };
const connect = (socket.unguardedConnect ??= socket.connect);
socket.connect = function (this: net.Socket, ...args: unknown[]) {
  // net.connect() passes its arguments already normalised, as one array: [options, callback].
  const first = (Array.isArray(args[0]) ? args[0][0] : args[0]) as { host?: string; path?: string } | number | string;
  if (typeof first === 'string' && !/^\d+$/.test(first)) return connect.apply(this, args); // unix socket path
  if (typeof first === 'object' && first !== null && first.path) return connect.apply(this, args);
  const host = typeof first === 'object' && first !== null ? first.host : typeof args[1] === 'string' ? args[1] : undefined;
  if (!mayConnect(host, allowedHosts())) {
    throw new Error(`tests may not reach the network: connection to ${host} refused`);
  }
  return connect.apply(this, args);
};
