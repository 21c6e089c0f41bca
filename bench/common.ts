// Shared helpers of the benchmark: statistics, child processes (tracked, always stopped), IPC calls,
// resident memory from /proc, and bounded waits.
import { fork, type ChildProcess } from 'node:child_process';
import { closeSync, openSync, readFileSync, writeFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { setTimeout as sleep } from 'node:timers/promises';

export { sleep };

export const benchDir = fileURLToPath(new URL('.', import.meta.url));

/** Milliseconds since the epoch with sub-millisecond precision, comparable across processes. */
export function nowMs(): number {
  return performance.timeOrigin + performance.now();
}

// ---------------------------------------------------------------------------------------------
// Statistics

export function percentile(values: number[], p: number): number {
  if (values.length === 0) return NaN;
  const sorted = [...values].sort((a, b) => a - b);
  const rank = Math.ceil((p / 100) * sorted.length);
  return sorted[Math.min(sorted.length - 1, Math.max(0, rank - 1))];
}

export const median = (values: number[]): number => {
  const v = values.filter((x) => Number.isFinite(x)).sort((a, b) => a - b);
  if (v.length === 0) return NaN;
  const mid = v.length >> 1;
  return v.length % 2 ? v[mid] : (v[mid - 1] + v[mid]) / 2;
};

/** Median of repeated runs plus the spread (min..max) that goes with it. */
export interface Summary {
  median: number;
  min: number;
  max: number;
  runs: number[];
}

export function summarize(runs: number[]): Summary {
  const finite = runs.filter((x) => Number.isFinite(x));
  return {
    median: median(finite),
    min: finite.length ? Math.min(...finite) : NaN,
    max: finite.length ? Math.max(...finite) : NaN,
    runs,
  };
}

// ---------------------------------------------------------------------------------------------
// Child processes

const children = new Set<ChildProcess>();

export interface ForkOptions {
  env: Record<string, string>;
  /** File that receives the child's stdout and stderr (service logs). */
  logFile: string;
  args?: string[];
}

/** Forks bench/<script> on the same Node binary, with an IPC channel; tracked until it exits. */
export function forkChild(script: string, options: ForkOptions): ChildProcess {
  const fd = openSync(options.logFile, 'a');
  const child = fork(fileURLToPath(new URL(script, import.meta.url)), options.args ?? [], {
    env: { PATH: process.env.PATH ?? '', HOME: process.env.HOME ?? '/tmp', ...options.env },
    stdio: ['ignore', fd, fd, 'ipc'],
    // As the service's start scripts and image run it (the baselines get the same flags).
    execArgv: ['--max-semi-space-size=2', ...(process.env.BENCH_CHILD_EXEC_ARGV ? process.env.BENCH_CHILD_EXEC_ARGV.split(' ') : [])],
    serialization: 'advanced',
  });
  closeSync(fd);
  children.add(child);
  child.once('exit', () => children.delete(child));
  return child;
}

/**
 * The first IPC message `pick` accepts (it returns the value, or an Error to fail), bounded by the
 * timeout and by the child's death; `what` names it in errors.
 */
/** An IPC message from a bench child; children send errors as text. */
type ChildMessage = Record<string, unknown> & { error?: string };

function awaitMessage<T>(child: ChildProcess, what: string, timeoutMs: number, pick: (m: ChildMessage) => T | Error | undefined): Promise<T> {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => done(new Error(`timed out after ${timeoutMs} ms waiting for ${what} from child ${child.pid}`)), timeoutMs);
    const onMessage = (m: ChildMessage) => {
      const picked = pick(m);
      if (picked instanceof Error) done(picked);
      else if (picked !== undefined) done(undefined, picked);
    };
    const onExit = (code: number | null, signal: string | null) => done(new Error(`child ${child.pid} exited (${code ?? signal}) before ${what}`));
    const done = (err?: Error, value?: T) => {
      clearTimeout(timer);
      child.off('message', onMessage);
      child.off('exit', onExit);
      if (err) reject(err);
      else resolve(value as T);
    };
    child.on('message', onMessage);
    child.once('exit', onExit);
  });
}

/** Waits for the first IPC message of `type` (or the child's death, or the timeout). */
export function waitForMessage<T = Record<string, unknown>>(child: ChildProcess, type: string, timeoutMs: number): Promise<T> {
  return awaitMessage(child, `'${type}'`, timeoutMs, (m) =>
    m.type === 'fatal' ? new Error(`child ${child.pid} failed: ${m.error}`) : m.type === type ? (m as T) : undefined,
  );
}

let nextCallId = 1;

/** A request over IPC: sends {cmd, id, ...args} and resolves with the child's {type:'reply', id} answer. */
export async function call<T = Record<string, unknown>>(child: ChildProcess, cmd: string, args: Record<string, unknown> = {}, timeoutMs = 60_000): Promise<T> {
  const id = nextCallId++;
  const reply = awaitMessage(child, `the reply to '${cmd}'`, timeoutMs, (m) =>
    m.type === 'reply' && m.id === id ? (m.error ? new Error(`child ${child.pid}: ${cmd} failed: ${m.error}`) : (m as T)) : undefined,
  );
  child.send({ ...args, cmd, id });
  return reply;
}

/** Asks the child to stop (IPC 'stop', then SIGTERM, then SIGKILL), bounded in time. */
export async function stopChild(child: ChildProcess, graceMs = 15_000): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return;
  const t0 = Date.now();
  try {
    await stopChildNow(child, graceMs);
  } finally {
    debug(`stopped child ${child.pid} in ${Date.now() - t0} ms`);
  }
}

/** Timing notes on stderr with BENCH_DEBUG=1. */
export function debug(message: string): void {
  if (process.env.BENCH_DEBUG) console.error(`[debug ${new Date().toISOString().slice(11, 23)}] ${message}`);
}

async function stopChildNow(child: ChildProcess, graceMs: number): Promise<void> {
  const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
  try {
    if (child.connected) child.send({ cmd: 'stop', id: 0 });
    else child.kill('SIGTERM');
  } catch {
    child.kill('SIGTERM');
  }
  const killed = await Promise.race([exited.then(() => true), sleep(graceMs).then(() => false)]);
  if (!killed) {
    child.kill('SIGKILL');
    await Promise.race([exited, sleep(5_000)]);
  }
}

/** Stops every child still running (end of run, failure, Ctrl-C). */
export async function stopAllChildren(): Promise<void> {
  await Promise.all([...children].map((c) => stopChild(c, 5_000).catch(() => c.kill('SIGKILL'))));
}

export function killAllChildrenNow(): void {
  for (const c of children) {
    try {
      c.kill('SIGKILL');
    } catch {
      // already gone
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Memory (Linux /proc; undefined elsewhere)

export interface MemoryInfo {
  /** Resident set size now, MB. */
  rssMb: number;
  /** Peak resident set size since start or the last resetPeak(), MB. */
  hwmMb: number;
}

export function readMemory(pid: number): MemoryInfo | undefined {
  try {
    const status = readFileSync(`/proc/${pid}/status`, 'utf8');
    const kb = (key: string) => Number(new RegExp(`^${key}:\\s+(\\d+) kB`, 'm').exec(status)?.[1] ?? NaN);
    return { rssMb: kb('VmRSS') / 1024, hwmMb: kb('VmHWM') / 1024 };
  } catch {
    return undefined;
  }
}

/** CPU time (user + system) a process has used so far, in ms (Linux /proc; NaN elsewhere). */
export function readCpuMs(pid: number): number {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    // fields[0] is field 3 (state); utime and stime are fields 14 and 15, in clock ticks (100 Hz).
    return ((Number(fields[11]) + Number(fields[12])) * 1000) / 100;
  } catch {
    return NaN;
  }
}

/** Resets the kernel's peak-RSS mark (VmHWM) of a process of ours; false when not possible. */
export function resetPeak(pid: number): boolean {
  try {
    writeFileSync(`/proc/${pid}/clear_refs`, '5');
    return true;
  } catch {
    return false;
  }
}

/** Samples VmRSS of `pid` every `intervalMs` and keeps the maximum (a check on VmHWM). */
export function sampleRss(pid: number, intervalMs = 100): { stop(): number } {
  let max = readMemory(pid)?.rssMb ?? NaN;
  const timer = setInterval(() => {
    const m = readMemory(pid);
    if (m && !(m.rssMb <= max)) max = m.rssMb;
  }, intervalMs);
  return {
    stop() {
      clearInterval(timer);
      const m = readMemory(pid);
      if (m && !(m.rssMb <= max)) max = m.rssMb;
      return max;
    },
  };
}

/** Peak RSS over a phase: reset VmHWM at the start, read it at the end (falls back to sampling). */
export function peakRss(pid: number): { stop(): number } {
  const reset = resetPeak(pid);
  const sampler = sampleRss(pid);
  return {
    stop() {
      const sampled = sampler.stop();
      const hwm = readMemory(pid)?.hwmMb ?? NaN;
      return reset && Number.isFinite(hwm) ? Math.max(hwm, sampled) : sampled;
    },
  };
}

// ---------------------------------------------------------------------------------------------
// Waits

/** Polls `check` until it returns true; throws after `timeoutMs`. */
export async function until(check: () => Promise<boolean>, what: string, timeoutMs: number, intervalMs = 100): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    if (await check()) return;
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await sleep(intervalMs);
  }
}
