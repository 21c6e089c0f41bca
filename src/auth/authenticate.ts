// The one place a request gets its principal: `Authorization: Bearer <key>`, or the anonymous local
// principal while the API is bound to loopback. What each route requires comes from the contract:
// an operation's `security` (empty: public; `{}` among the options: a key is optional).
import type { Request, RequestHandler, Response } from 'express';
import type { Config } from '../config.ts';
import type { Database } from '../db/database.ts';
import { AppError } from '../errors.ts';
import { findActiveApiKey } from './api-key.repository.ts';
import { hashApiKey, isLoopbackHost, LOCAL_PRINCIPAL, type Principal } from './principal.ts';

export type AuthConfig = Pick<Config, 'HOST' | 'ANONYMOUS_ACCESS' | 'KEY_MAX_PRIORITY'>;

/** How long a key found in the database is trusted without asking again (so a revocation takes this long). */
export const KEY_CACHE_MS = 5_000;
const KEY_CACHE_MAX = 10_000;

type Requirement = 'required' | 'optional' | 'none';

interface OpenApiOperation {
  security?: Record<string, string[]>[];
}
interface OpenApiDocument {
  security?: Record<string, string[]>[];
  paths: Record<string, Record<string, OpenApiOperation>>;
}

/** The principal of this request (set by the authenticator; undefined on public routes). */
export function principalOf(res: Response): Principal | undefined {
  return res.locals.principal as Principal | undefined;
}

/** The principal of a route that requires one. */
export function requirePrincipal(res: Response): Principal {
  const principal = principalOf(res);
  if (!principal) throw new Error('no principal on a route that requires one: is the route declared with security in openapi.yaml?');
  return principal;
}

export interface AuthenticatorDeps {
  db: Database;
  config: AuthConfig;
  spec: OpenApiDocument;
}

export function createAuthenticator(deps: AuthenticatorDeps): RequestHandler {
  const requirementOf = routeRequirements(deps.spec);
  const anonymousAllowed = deps.config.ANONYMOUS_ACCESS === 'loopback' && isLoopbackHost(deps.config.HOST);
  const cache = new Map<string, { principal: Principal; until: number }>();

  const principalForKey = async (key: string): Promise<Principal | undefined> => {
    const hash = hashApiKey(key);
    const cached = cache.get(hash);
    if (cached && cached.until > Date.now()) return cached.principal;
    const row = await findActiveApiKey(deps.db, hash);
    if (!row) {
      cache.delete(hash);
      return undefined;
    }
    const principal: Principal = {
      keyId: row.id,
      operator: row.operator,
      local: false,
      maxPriority: row.max_priority ?? (row.operator ? 100 : deps.config.KEY_MAX_PRIORITY),
    };
    if (cache.size >= KEY_CACHE_MAX) cache.clear();
    cache.set(hash, { principal, until: Date.now() + KEY_CACHE_MS });
    return principal;
  };

  return async (req, res, next) => {
    try {
      const requirement = requirementOf(req);
      if (requirement === 'none') return next();
      const header = req.headers.authorization;
      if (header === undefined) {
        if (anonymousAllowed) res.locals.principal = LOCAL_PRINCIPAL;
        else if (requirement === 'required') throw unauthorized(res, 'this request needs an API key: send `Authorization: Bearer <key>`');
        return next();
      }
      const match = /^Bearer +([\x21-\x7e]{1,512}) *$/i.exec(header);
      if (!match) throw unauthorized(res, 'the Authorization header must be `Bearer <key>`', 'invalid_request');
      const principal = await principalForKey(match[1]);
      if (!principal) throw unauthorized(res, 'the API key is not valid (unknown or revoked)', 'invalid_token');
      res.locals.principal = principal;
      next();
    } catch (err) {
      next(err);
    }
  };
}

function unauthorized(res: Response, detail: string, error?: 'invalid_request' | 'invalid_token'): AppError {
  res.set('WWW-Authenticate', `Bearer realm="media-gen"${error ? `, error="${error}"` : ''}`);
  return new AppError('unauthorized', detail);
}

/** What each operation of the contract requires, matched by method and path template. */
function routeRequirements(spec: OpenApiDocument): (req: Request) => Requirement {
  const requirementOf = (security: Record<string, string[]>[] | undefined): Requirement => {
    const options = security ?? spec.security ?? [];
    if (options.length === 0) return 'none';
    return options.some((o) => Object.keys(o).length === 0) ? 'optional' : 'required';
  };
  const routes = Object.entries(spec.paths).flatMap(([template, operations]) => {
    // Matched as express routes (case-insensitive, trailing slash optional), or `/GENERATE` would pass
    // as a path the contract does not know.
    const pattern = new RegExp(`^${template.replace(/[.*+?^$()|[\]\\]/g, '\\$&').replace(/\{[^}]+\}/g, '[^/]+')}/?$`, 'i');
    return Object.entries(operations)
      .filter(([method]) => ['get', 'put', 'post', 'delete', 'patch', 'head', 'options'].includes(method))
      .map(([method, op]) => ({ method: method.toUpperCase(), pattern, requirement: requirementOf(op.security) }));
  });
  return (req) => {
    const method = req.method === 'HEAD' ? 'GET' : req.method;
    // A path the contract does not know (docs assets, a 404) needs no key; 405s on known paths do.
    let known: Requirement | undefined;
    for (const route of routes) {
      if (!route.pattern.test(req.path)) continue;
      if (route.method === method) return route.requirement;
      known ??= route.requirement;
    }
    return known ?? 'none';
  };
}
