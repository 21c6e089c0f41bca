// GET /media/:file for media kept in a bucket: the object streamed through the API (same URL, same
// access rules and private caching as local files), conditional requests answered by the bucket.
import { pipeline } from 'node:stream/promises';
import type { Request, Response } from 'express';
import { AppError } from '../errors.ts';
import { contentTypeOf, MediaStorageError, type ObjectMediaStorage } from '../media/storage.ts';
import { RETRY_AFTER_SECONDS } from './problem.ts';

/** Answers with the stored file; false when there is none (the caller answers 404). */
export async function sendStoredMedia(storage: ObjectMediaStorage, name: string, req: Request, res: Response): Promise<boolean> {
  const since = req.get('if-modified-since');
  const sinceDate = since ? new Date(since) : undefined;
  let found;
  try {
    found = await storage.read(name, {
      ifNoneMatch: req.get('if-none-match'),
      ifModifiedSince: sinceDate && !Number.isNaN(sinceDate.getTime()) ? sinceDate : undefined,
    });
  } catch (err) {
    if (!(err instanceof MediaStorageError)) throw err;
    req.log.warn({ err }, 'media storage not reachable');
    const unavailable = new AppError('unavailable', 'the media storage is not reachable right now; try again shortly');
    unavailable.retryAfterSeconds = RETRY_AFTER_SECONDS;
    throw unavailable;
  }
  if (found === undefined) return false;
  if (found === 'not-modified') {
    res.status(304).end();
    return true;
  }
  res.status(200).type(contentTypeOf(name));
  if (found.bytes !== undefined) res.set('Content-Length', String(found.bytes));
  if (found.etag) res.set('ETag', found.etag);
  if (found.lastModified) res.set('Last-Modified', found.lastModified.toUTCString());
  // A client that goes away mid-transfer ends the pipeline early: nothing to report.
  await pipeline(found.body, res).catch(() => res.destroy());
  return true;
}
