// Calls made on a client's behalf (webhooks) may only reach public addresses: one classifier
// (ipaddr.js) decides, both when a URL is accepted and on the address each connection actually uses.
//
// Why not request-filtering-agent, which hooks connections the same way: its allow-list prints a stack
// trace through console.warn whenever an IPv6 address meets an IPv4 range (a development allow-list of
// `127.0.0.0/8,::1/128` would on every delivery to `localhost`), and its check is not exported, so the
// submit-time check could not share it and the two could drift.
import dns, { type LookupAddress } from 'node:dns';
import http from 'node:http';
import https from 'node:https';
import net, { type LookupFunction } from 'node:net';
import type { Duplex } from 'node:stream';
import ipaddr from 'ipaddr.js';

export interface OutboundPolicy {
  /** Ranges allowed even though they are not public (development: `127.0.0.0/8,::1/128`). */
  allowedCidrs?: readonly string[];
  /** Resolves host names (tests inject one to simulate DNS rebinding); defaults to dns.lookup. */
  lookup?: LookupFunction;
}

/** `10.0.0.0/8` or a single address (`::1`) as canonical CIDR text; throws on anything else. */
export function parseCidr(text: string): string {
  const parts = text.trim().split('/');
  // net.isIP, not ipaddr.isValid: the latter also takes `127.1` and `0x7f000001`, which no one means.
  const family = net.isIP(parts[0]);
  const max = family === 4 ? 32 : 128;
  const bits = parts.length === 2 ? parts[1] : String(max);
  if (family === 0 || parts.length > 2 || !/^\d{1,3}$/.test(bits) || Number(bits) > max) {
    throw new Error(`${text} is not an IP address or CIDR range`);
  }
  return `${ipaddr.parse(parts[0]).toString()}/${Number(bits)}`;
}

/** Why `address` may not be reached (its range, e.g. `loopback`), or undefined when it may. */
export function forbiddenRange(address: string, allowedCidrs: readonly string[] = []): string | undefined {
  if (net.isIP(address) === 0) return 'unparseable';
  const ip = ipaddr.parse(address);
  const allowed = allowedCidrs.map((c) => ipaddr.parseCIDR(c)).some(([range, bits]) => range.kind() === ip.kind() && (ip as ipaddr.IPv4).match(range, bits));
  if (allowed) return undefined;
  // Only global unicast: loopback, unspecified, private, carrierGradeNat, linkLocal, multicast,
  // uniqueLocal, ipv4Mapped (whatever it maps), 6to4, teredo, reserved… are all refused.
  const range = ip.range();
  return range === 'unicast' ? undefined : range;
}

export class ForbiddenAddressError extends Error {
  readonly code = 'EFORBIDDENADDRESS';
}

/** What is wrong with the URL itself (not its address): http(s) only, no credentials. */
export function urlShapeProblem(text: string): string | undefined {
  let url: URL;
  try {
    url = new URL(text);
  } catch {
    return 'is not a URL';
  }
  if (url.protocol !== 'http:' && url.protocol !== 'https:') return 'must be http or https';
  if (url.username || url.password) return 'must not carry credentials (user:password@)';
  return undefined;
}

/**
 * Why the URL may not be called, or undefined when it may: http(s) only, no credentials, and a host
 * that is (or resolves to) public addresses only. A name that does not resolve (now) passes: the
 * connection-time check is the one that counts, and it refuses what this one could not see.
 */
export async function checkOutboundUrl(text: string, policy: OutboundPolicy = {}, resolveTimeoutMs = 2000): Promise<string | undefined> {
  const problem = urlShapeProblem(text);
  if (problem) return problem;
  const url = new URL(text);
  // The WHATWG parser has already turned 2130706433, 0x7f000001 and 127.1 into 127.0.0.1.
  const host = url.hostname.replace(/^\[(.*)\]$/, '$1');
  let addresses: string[];
  if (net.isIP(host) !== 0) {
    addresses = [host];
  } else {
    const resolved = await resolveAll(host, policy.lookup ?? dns.lookup, resolveTimeoutMs);
    if (!resolved) return undefined;
    addresses = resolved.map((a) => a.address);
  }
  for (const address of addresses) {
    const range = forbiddenRange(address, policy.allowedCidrs);
    if (range) return `must not point at a ${range} address (${host === address ? address : `${host} resolves to ${address}`})`;
  }
  return undefined;
}

function resolveAll(host: string, lookup: LookupFunction, timeoutMs: number): Promise<LookupAddress[] | undefined> {
  return new Promise((resolve) => {
    const timer = setTimeout(() => resolve(undefined), timeoutMs);
    lookup(host, { all: true }, (err, addresses) => {
      clearTimeout(timer);
      resolve(err ? undefined : (addresses as unknown as LookupAddress[]));
    });
  });
}

/** A lookup that fails when any address of the name is forbidden (checked as the socket connects). */
function guardedLookup(policy: OutboundPolicy, given?: LookupFunction): LookupFunction {
  const lookup = given ?? policy.lookup ?? dns.lookup;
  return (hostname, options, callback) => {
    lookup(hostname, { ...options, all: true }, (err, result) => {
      if (err) return callback(err, '', 0);
      const addresses = result as unknown as LookupAddress[];
      for (const { address } of addresses) {
        const range = forbiddenRange(address, policy.allowedCidrs);
        if (range) return callback(new ForbiddenAddressError(`${hostname} resolves to ${address}, a ${range} address`), '', 0);
      }
      if (addresses.length === 0) return callback(Object.assign(new Error(`${hostname} has no address`), { code: 'ENOTFOUND' }), '', 0);
      if (options.all) return (callback as unknown as (e: null, a: LookupAddress[]) => void)(null, addresses);
      callback(null, addresses[0].address, addresses[0].family);
    });
  };
}

type CreateConnection = (
  options: net.NetConnectOpts & { host?: string; lookup?: LookupFunction },
  callback?: (err: Error | null, socket: Duplex) => void,
) => Duplex;

/** Checks the literal address, or wraps the lookup, before the base agent opens the socket. */
function guard(policy: OutboundPolicy, create: CreateConnection): CreateConnection {
  return (options, callback) => {
    const host = options.host ?? '';
    const range = net.isIP(host) !== 0 ? forbiddenRange(host, policy.allowedCidrs) : undefined;
    if (range) {
      const socket = new net.Socket();
      const error = new ForbiddenAddressError(`${host} is a ${range} address`);
      if (callback) callback(error, socket);
      else process.nextTick(() => socket.destroy(error));
      return socket;
    }
    return create({ ...options, lookup: guardedLookup(policy, options.lookup) }, callback);
  };
}

export interface OutboundAgents {
  http: http.Agent;
  https: https.Agent;
}

/**
 * Agents (for got's `agent` option) whose every connection goes only where the policy allows: the
 * address checked is the one connected to, so a name that resolves differently later (DNS rebinding)
 * is caught too. Own agents also keep NODE_USE_ENV_PROXY's global proxy out of webhook traffic.
 */
export function createOutboundAgents(policy: OutboundPolicy): OutboundAgents {
  const httpAgent = new http.Agent();
  const httpsAgent = new https.Agent();
  // createConnection is what http.Agent calls per socket (documented as overridable).
  const h = httpAgent as unknown as { createConnection: CreateConnection };
  h.createConnection = guard(policy, h.createConnection.bind(httpAgent));
  const s = httpsAgent as unknown as { createConnection: CreateConnection };
  s.createConnection = guard(policy, s.createConnection.bind(httpsAgent));
  return { http: httpAgent, https: httpsAgent };
}
