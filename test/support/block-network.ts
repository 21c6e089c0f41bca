// Tests may only talk to this machine: any connection to another address fails at once.
import net from 'node:net';

const connect = net.Socket.prototype.connect;
const loopback = (host: string | undefined) =>
  host === undefined || host === 'localhost' || host === '::1' || host.startsWith('127.') || host === '::ffff:127.0.0.1' || host.startsWith('/');

net.Socket.prototype.connect = function (this: net.Socket, ...args: unknown[]) {
  const first = args[0] as { host?: string; path?: string } | number | string;
  const host = typeof first === 'object' && first !== null ? (first.path ? '/' : first.host) : typeof args[1] === 'string' ? args[1] : undefined;
  if (typeof first === 'string' && !/^\d+$/.test(first)) return connect.apply(this, args as never); // unix socket path
  if (!loopback(host)) {
    throw new Error(`tests may not reach the network: connection to ${host} refused`);
  }
  return connect.apply(this, args as never);
} as typeof net.Socket.prototype.connect;
