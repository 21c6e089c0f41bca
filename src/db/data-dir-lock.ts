// One `npm start` per DATA_DIR. A second one must not take the embedded Postgres of the first for an
// orphan and stop it: it refuses, naming the process that holds the folder. A lock left by a crash
// (its process gone) is taken over.
import { mkdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import path from 'node:path';

export interface DataDirOwner {
  pid: number;
  /** The owner's API port, to name it in the refusal. */
  port?: number;
  /** The process's start time (from /proc), so a recycled pid is not taken for the owner. */
  started?: string;
}

export class DataDirInUseError extends Error {
  readonly owner: DataDirOwner;
  constructor(dir: string, owner: DataDirOwner) {
    super(`${dir} is in use by another process (pid ${owner.pid}${owner.port === undefined ? '' : `, its API on port ${owner.port}`})`);
    this.name = 'DataDirInUseError';
    this.owner = owner;
  }
}

export interface DataDirLock {
  release(): void;
}

export function lockDataDir(dir: string, info: { port?: number } = {}): DataDirLock {
  const file = path.join(dir, 'owner.json');
  mkdirSync(dir, { recursive: true });
  const me: DataDirOwner = { pid: process.pid, ...info, started: startTime(process.pid) };
  for (;;) {
    try {
      writeFileSync(file, JSON.stringify(me), { flag: 'wx' });
      break;
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw err;
    }
    const owner = readOwner(file);
    if (owner && isRunning(owner)) throw new DataDirInUseError(dir, owner);
    rmSync(file, { force: true }); // left by a crash: take it over (and retry the exclusive create)
  }
  return {
    release: () => {
      if (readOwner(file)?.pid === process.pid) rmSync(file, { force: true });
    },
  };
}

function readOwner(file: string): DataDirOwner | undefined {
  try {
    const owner = JSON.parse(readFileSync(file, 'utf8')) as DataDirOwner;
    return Number.isInteger(owner.pid) ? owner : undefined;
  } catch {
    return undefined; // gone, or half-written by a crash
  }
}

function isRunning(owner: DataDirOwner): boolean {
  if (owner.pid === process.pid) return false;
  try {
    process.kill(owner.pid, 0);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'EPERM') return false;
  }
  return owner.started === undefined || owner.started === startTime(owner.pid);
}

/** Field 22 of /proc/<pid>/stat (start time since boot); undefined where there is no /proc. */
function startTime(pid: number): string | undefined {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    return stat.slice(stat.lastIndexOf(')') + 2).split(' ')[19];
  } catch {
    return undefined;
  }
}
