// A small Server-Sent Events reader over fetch, for tests.
export interface SseEvent {
  event: string;
  id?: string;
  data: unknown;
}

export interface SseStream {
  events: SseEvent[];
  /** Resolves when the server ends the stream. */
  ended: Promise<void>;
  /** Resolves once `n` events arrived. */
  next(n: number, timeoutMs?: number): Promise<SseEvent[]>;
  close(): void;
}

export async function openSse(url: string, headers: Record<string, string> = {}): Promise<SseStream & { status: number; contentType: string | null }> {
  const controller = new AbortController();
  const res = await fetch(url, { headers: { accept: 'text/event-stream', ...headers }, signal: controller.signal });
  const events: SseEvent[] = [];
  const waiters: { n: number; resolve: () => void }[] = [];
  const wake = () => waiters.filter((w) => events.length >= w.n).forEach((w) => w.resolve());
  const ended = (async () => {
    if (!res.body) return;
    const decoder = new TextDecoder();
    let buffer = '';
    try {
      for await (const chunk of res.body) {
        buffer += decoder.decode(chunk as Uint8Array, { stream: true });
        let split: number;
        while ((split = buffer.indexOf('\n\n')) >= 0) {
          const block = buffer.slice(0, split);
          buffer = buffer.slice(split + 2);
          const event: Partial<SseEvent> & { lines: string[] } = { event: 'message', lines: [] };
          for (const line of block.split('\n')) {
            if (line.startsWith(':')) continue;
            const [field, ...rest] = line.split(':');
            const value = rest.join(':').replace(/^ /, '');
            if (field === 'event') event.event = value;
            else if (field === 'id') event.id = value;
            else if (field === 'data') event.lines.push(value);
          }
          if (event.lines.length) {
            events.push({ event: event.event!, id: event.id, data: JSON.parse(event.lines.join('\n')) });
            wake();
          }
        }
      }
    } catch (err) {
      if ((err as Error).name !== 'AbortError') throw err;
    }
  })();
  return {
    status: res.status,
    contentType: res.headers.get('content-type'),
    events,
    ended,
    next: (n, timeoutMs = 20_000) =>
      events.length >= n
        ? Promise.resolve(events.slice(0, n))
        : new Promise((resolve, reject) => {
            const timer = setTimeout(
              () => reject(new Error(`only ${events.length} of ${n} events after ${timeoutMs} ms: ${JSON.stringify(events)}`)),
              timeoutMs,
            );
            waiters.push({ n, resolve: () => (clearTimeout(timer), resolve(events.slice(0, n))) });
          }),
    close: () => controller.abort(),
  };
}
