// All SQL about API keys: create, find by hash, list, revoke, and each key's webhook signing secret.
import { sql, type Selectable } from 'kysely';
import type { Database } from '../db/database.ts';
import type { ApiKeys } from '../db/types.ts';
import { generateWebhookSecret, hashApiKey, LOCAL_PRINCIPAL_ID } from './principal.ts';

export type ApiKeyRow = Selectable<ApiKeys>;
/** A key as lists show it: never the hash or the webhook secret. */
export type ApiKeySummary = Pick<ApiKeyRow, 'id' | 'name' | 'prefix' | 'operator' | 'max_priority' | 'created_at' | 'revoked_at'>;

const SUMMARY = ['id', 'name', 'prefix', 'operator', 'max_priority', 'created_at', 'revoked_at'] as const;

export interface NewApiKey {
  name: string;
  prefix: string;
  hash: string;
  operator: boolean;
  maxPriority?: number;
}

export async function insertApiKey(db: Database, key: NewApiKey): Promise<ApiKeySummary> {
  return db
    .insertInto('api_keys')
    .values({
      name: key.name,
      prefix: key.prefix,
      key_hash: key.hash,
      operator: key.operator,
      max_priority: key.maxPriority ?? null,
      webhook_secret: generateWebhookSecret(),
    })
    .returning(SUMMARY)
    .executeTakeFirstOrThrow();
}

/** The unrevoked key with this hash. */
export async function findActiveApiKey(db: Database, hash: string): Promise<ApiKeySummary | undefined> {
  return db.selectFrom('api_keys').select(SUMMARY).where('key_hash', '=', hash).where('revoked_at', 'is', null).executeTakeFirst();
}

/** Every key but the built-in local principal, oldest first. */
export async function listApiKeys(db: Database): Promise<ApiKeySummary[]> {
  return db.selectFrom('api_keys').select(SUMMARY).where('id', '!=', LOCAL_PRINCIPAL_ID).orderBy('created_at').execute();
}

/** The keys `given` names: a key id, a whole key, or the start of a key as `keys list` shows it. */
export async function findApiKeys(db: Database, given: string): Promise<ApiKeySummary[]> {
  const isId = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i.test(given);
  const startsWith = `${given.replace(/[\\%_]/g, (c) => `\\${c}`)}%`;
  return db
    .selectFrom('api_keys')
    .select(SUMMARY)
    .where('id', '!=', LOCAL_PRINCIPAL_ID)
    .where((eb) => (isId ? eb('id', '=', given) : eb.or([eb('key_hash', '=', hashApiKey(given)), eb('prefix', 'like', startsWith)])))
    .execute();
}

export async function revokeApiKey(db: Database, id: string): Promise<ApiKeySummary | undefined> {
  return db
    .updateTable('api_keys')
    .set({ revoked_at: sql`coalesce(revoked_at, now())` })
    .where('id', '=', id)
    .where('id', '!=', LOCAL_PRINCIPAL_ID)
    .returning(SUMMARY)
    .executeTakeFirst();
}

/** The webhook signing secret of a key (its jobs' deliveries are signed with it), generated on first use. */
export async function getKeyWebhookSecret(db: Database, keyId: string): Promise<string> {
  const row = await db.selectFrom('api_keys').select('webhook_secret').where('id', '=', keyId).executeTakeFirstOrThrow();
  if (row.webhook_secret) return row.webhook_secret;
  await db.updateTable('api_keys').set({ webhook_secret: generateWebhookSecret() }).where('id', '=', keyId).where('webhook_secret', 'is', null).execute();
  const generated = await db.selectFrom('api_keys').select('webhook_secret').where('id', '=', keyId).executeTakeFirstOrThrow();
  return generated.webhook_secret!;
}
