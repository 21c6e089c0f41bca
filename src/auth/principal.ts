// Who is calling: the principal every API request runs as, and the key material behind it.
import { createHash, randomBytes } from 'node:crypto';

/** The built-in owner of requests without a key, allowed only while the API is bound to loopback. */
export const LOCAL_PRINCIPAL_ID = '00000000-0000-0000-0000-000000000000';

export interface Principal {
  /** The api_keys row; every job, stream and webhook secret belongs to one. */
  keyId: string;
  /** May see and cancel every job (not other keys' webhook secrets). */
  operator: boolean;
  /** The anonymous local principal: no key, no limits, loopback only. */
  local: boolean;
  /** Highest job priority this principal may ask for. */
  maxPriority: number;
}

export const LOCAL_PRINCIPAL: Readonly<Principal> = Object.freeze({ keyId: LOCAL_PRINCIPAL_ID, operator: false, local: true, maxPriority: 100 });

/** Keys look like `mgk_<43 base64url characters>` (256 random bits), so scanners can recognise them. */
const KEY_TAG = 'mgk_';
/** How many leading characters of a key are kept in clear, to tell keys apart in `keys list`. */
const PREFIX_LENGTH = KEY_TAG.length + 8;

export interface NewKeyMaterial {
  key: string;
  prefix: string;
  hash: string;
}

export function generateApiKey(): NewKeyMaterial {
  const key = `${KEY_TAG}${randomBytes(32).toString('base64url')}`;
  return { key, prefix: key.slice(0, PREFIX_LENGTH), hash: hashApiKey(key) };
}

/** SHA-256: keys carry 256 random bits, so a fast hash is safe (a slow one only guards weak secrets). */
export function hashApiKey(key: string): string {
  return createHash('sha256').update(key).digest('hex');
}

/** A webhook signing secret (`whsec_<base64>`, Standard Webhooks' format). */
export function generateWebhookSecret(): string {
  return `whsec_${randomBytes(32).toString('base64')}`;
}

/** Whether `host` (the address the API binds to) only accepts connections from this machine. */
export function isLoopbackHost(host: string): boolean {
  const h = host
    .trim()
    .toLowerCase()
    .replace(/^\[|\]$/g, '');
  return h === 'localhost' || h === '::1' || /^127(\.\d{1,3}){3}$/.test(h) || /^::ffff:127(\.\d{1,3}){3}$/.test(h);
}
