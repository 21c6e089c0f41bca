// The page at `/`: submit prompts, watch the caller's recent jobs live (Server-Sent Events read with
// fetch, so the API key can go in a header), browse the finished images. It uses the public API only,
// with the key from the field below (kept in localStorage) when one is set.

const TERMINAL = new Set(['completed', 'failed', 'canceled']);
const MAX_STREAMS = 4; // a browser opens about 6 connections per origin: leave some for everything else
const KEY_STORAGE = 'media-gen-service.api-key';

const $ = (id) => document.getElementById(id);
const jobs = new Map(); // job_id → the job as /jobs/{id} shows it (updated from events)
const streams = new Map(); // job_id → AbortController of its event stream

// --- API -------------------------------------------------------------------------------------------

function apiKey() {
  return $('api-key').value.trim();
}

async function api(method, path, body) {
  const headers = { accept: 'application/json' };
  if (apiKey()) headers.authorization = `Bearer ${apiKey()}`;
  if (body !== undefined) headers['content-type'] = 'application/json';
  const res = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  const data = await res.json().catch(() => undefined);
  if (!res.ok) throw problemError(res.status, data);
  return data;
}

function problemError(status, problem) {
  let message = problem?.detail ?? problem?.title ?? `the server answered ${status}`;
  if (status === 401) {
    message = 'This server needs an API key: enter yours under “API key”.';
    $('key-details').open = true;
  }
  const err = new Error(message);
  err.status = status;
  err.problem = problem;
  return err;
}

function notify(message) {
  const notice = $('notice');
  notice.textContent = message ?? '';
  notice.hidden = !message;
}

// --- The live list ---------------------------------------------------------------------------------

async function loadJobs() {
  try {
    const page = await api('GET', '/jobs?limit=24');
    for (const job of page.jobs) jobs.set(job.job_id, job);
    notify();
  } catch (err) {
    notify(`Could not load your jobs: ${err.message}`);
  }
  render();
  follow();
}

/** Streams the events of active jobs (up to MAX_STREAMS at once); the others are polled. */
function follow() {
  for (const job of jobs.values()) {
    if (TERMINAL.has(job.status) || streams.has(job.job_id) || streams.size >= MAX_STREAMS) continue;
    void stream(job.job_id);
  }
  const waiting = [...jobs.values()].some((j) => !TERMINAL.has(j.status) && !streams.has(j.job_id));
  if (waiting && !follow.timer) {
    follow.timer = setTimeout(async () => {
      follow.timer = undefined;
      for (const job of [...jobs.values()].filter((j) => !TERMINAL.has(j.status) && !streams.has(j.job_id))) await refresh(job.job_id);
      follow();
    }, 2000);
  }
}

async function stream(id) {
  const controller = new AbortController();
  streams.set(id, controller);
  let lastEventId;
  try {
    for (let attempt = 0; attempt < 5 && !TERMINAL.has(jobs.get(id)?.status); attempt++) {
      const headers = { accept: 'text/event-stream' };
      if (apiKey()) headers.authorization = `Bearer ${apiKey()}`;
      if (lastEventId) headers['last-event-id'] = lastEventId;
      const res = await fetch(`/jobs/${id}/events`, { headers, signal: controller.signal });
      if (!res.ok) throw problemError(res.status, await res.json().catch(() => undefined));
      for await (const event of readEvents(res.body)) {
        if (event.id) lastEventId = event.id;
        await onEvent(id, event);
      }
    }
  } catch (err) {
    if (err.name !== 'AbortError') await refresh(id);
  } finally {
    streams.delete(id);
    follow();
  }
}

/** Server-Sent Events from a response body: {event, id, data}. */
async function* readEvents(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = '';
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf('\n\n')) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const event = { event: 'message', data: '' };
      for (const line of block.split('\n')) {
        if (line.startsWith(':')) continue;
        const colon = line.indexOf(':');
        const field = colon < 0 ? line : line.slice(0, colon);
        const value = colon < 0 ? '' : line.slice(colon + 1).replace(/^ /, '');
        if (field === 'data') event.data += (event.data ? '\n' : '') + value;
        else if (field === 'event' || field === 'id') event[field] = value;
      }
      if (event.data) yield { ...event, data: JSON.parse(event.data) };
    }
  }
}

async function onEvent(id, { event, data }) {
  const job = jobs.get(id);
  if (!job) return;
  const before = job.status;
  if (data.job) {
    jobs.set(id, data.job); // the terminal event carries the whole job
  } else {
    job.status = data.status;
    if (event === 'position') job.queue_position = data.queue_position;
    if (data.progress !== undefined) job.progress = data.progress;
    if (data.status !== 'queued') delete job.queue_position;
    // A change of status may come with a new attempt or error: those are on the job itself.
    if (event === 'status') await refresh(id);
  }
  if (jobs.get(id).status !== before) announce(jobs.get(id));
  render();
}

async function refresh(id) {
  try {
    jobs.set(id, await api('GET', `/jobs/${id}`));
  } catch (err) {
    if (err.status === 404) jobs.delete(id);
  }
  render();
}

function announce(job) {
  $('announce').textContent = `“${shorten(job.prompt, 40)}”: ${job.status}`;
}

// --- Actions -----------------------------------------------------------------------------------------

async function submit(body) {
  const accepted = await api('POST', '/generate', body);
  jobs.set(accepted.job_id, { job_id: accepted.job_id, status: accepted.status, prompt: body.prompt, parameters: body.parameters, attempts: 0, outputs: [] });
  render();
  await refresh(accepted.job_id);
  follow();
  return accepted.job_id;
}

async function cancel(id) {
  try {
    jobs.set(id, await api('POST', `/jobs/${id}/cancel`));
  } catch (err) {
    if (err.problem?.job)
      jobs.set(id, err.problem.job); // it had finished already
    else notify(`Could not cancel: ${err.message}`);
  }
  render();
}

async function runAgain(id) {
  const job = jobs.get(id);
  try {
    await submit({ prompt: job.prompt, parameters: job.parameters });
    notify();
  } catch (err) {
    notify(`Could not submit: ${err.message}`);
  }
}

// --- Rendering ---------------------------------------------------------------------------------------

function shorten(text, n) {
  return text.length > n ? `${text.slice(0, n - 1)}…` : text;
}

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (key === 'dataset') Object.assign(node.dataset, value);
    else if (key.startsWith('on')) node.addEventListener(key.slice(2), value);
    else if (value !== undefined) node[key] = value;
  }
  node.append(...children.filter((c) => c !== undefined && c !== null));
  return node;
}

function sorted() {
  return [...jobs.values()].sort((a, b) => (b.created_at ?? '9').localeCompare(a.created_at ?? '9'));
}

function render() {
  const list = $('jobs');
  const items = sorted().map(renderJob);
  // Keep focus on a button that survives the re-render.
  const focused = document.activeElement?.dataset?.action ? `${document.activeElement.dataset.action}:${document.activeElement.dataset.jobId}` : undefined;
  list.replaceChildren(...items);
  if (focused) list.querySelector(`[data-action="${focused.split(':')[0]}"][data-job-id="${focused.split(':')[1]}"]`)?.focus();
  $('jobs-empty').hidden = items.length > 0;
  renderGallery();
}

function renderJob(job) {
  const p = job.parameters ?? {};
  const facts = [];
  if (p.width) facts.push(`${p.width}×${p.height} ${p.output_format}`);
  if (p.num_outputs > 1) facts.push(`${p.num_outputs} images`);
  if (p.seed !== undefined) facts.push(`seed ${p.seed}`);
  if (job.attempts) facts.push(`attempt ${job.attempts}`);

  const state = [];
  if (job.status === 'queued' && job.queue_position)
    state.push(el('span', { className: 'position', textContent: `position ${job.queue_position} in the queue` }));
  if (job.status === 'processing' && job.progress !== undefined) {
    state.push(el('progress', { max: 1, value: job.progress, ariaLabel: 'progress' }), el('span', { textContent: ` ${Math.round(job.progress * 100)}%` }));
  }
  const error = job.error ?? job.last_error;
  // A job still running can be canceled; a finished one can be run again.
  const finished = TERMINAL.has(job.status);
  const action = el('button', {
    type: 'button',
    className: 'secondary',
    textContent: finished ? 'Run again' : 'Cancel',
    dataset: { action: finished ? 'again' : 'cancel', jobId: job.job_id },
    onclick: () => (finished ? runAgain : cancel)(job.job_id),
  });

  return el(
    'li',
    { className: `job ${job.status}`, dataset: { jobId: job.job_id, status: job.status } },
    el(
      'div',
      { className: 'job-head' },
      el('span', { className: `status ${job.status}`, textContent: job.status }),
      el('span', { className: 'prompt', textContent: shorten(job.prompt ?? '', 120), title: job.prompt ?? '' }),
    ),
    el('div', { className: 'job-facts', textContent: facts.join(' · ') }),
    state.length ? el('div', { className: 'job-state' }, ...state) : undefined,
    error ? el('div', { className: 'error', textContent: `${job.status === 'failed' ? 'Error' : 'Last error (will retry)'}: ${error}` }) : undefined,
    el('div', { className: 'actions' }, action),
  );
}

function renderGallery() {
  const items = [];
  for (const job of sorted()) {
    if (job.status !== 'completed') continue;
    (job.outputs ?? []).forEach((output, i) => {
      const label = `${shorten(job.prompt, 60)}${job.outputs.length > 1 ? ` (${i + 1} of ${job.outputs.length})` : ''}`;
      items.push(
        el(
          'li',
          {},
          el(
            'button',
            { type: 'button', className: 'thumb', title: `View full size: ${label}`, dataset: { jobId: job.job_id }, onclick: () => view(job, output, label) },
            el('img', {
              src: output.thumbnail_url ?? output.url,
              alt: label,
              loading: 'lazy',
              width: 128,
              height: Math.round((128 * output.height) / output.width),
            }),
          ),
        ),
      );
    });
  }
  $('gallery').replaceChildren(...items);
  $('gallery-empty').hidden = items.length > 0;
}

function view(job, output, label) {
  $('viewer-image').src = output.url;
  $('viewer-image').alt = label;
  $('viewer-image').width = output.width;
  $('viewer-image').height = output.height;
  $('viewer-caption').textContent = `${label} — ${output.width}×${output.height} ${output.format}, ${Math.round(output.bytes / 1024)} KiB`;
  $('viewer-download').href = output.url;
  $('viewer-download').setAttribute('download', output.url.split('/').pop());
  $('viewer').showModal();
}

// --- Wiring ----------------------------------------------------------------------------------------

$('generate').addEventListener('submit', async (event) => {
  event.preventDefault();
  const [width, height] = $('size').value.split('x').map(Number);
  const parameters = { width, height, output_format: $('format').value, num_outputs: Number($('outputs').value) || 1 };
  if ($('seed').value !== '') parameters.seed = Number($('seed').value);
  $('submit').disabled = true;
  try {
    await submit({ prompt: $('prompt').value, parameters });
    notify();
  } catch (err) {
    const fields = (err.problem?.errors ?? []).map((e) => `${e.path.replace('/body/', '')} ${e.message}`);
    notify(`Could not submit: ${fields.length ? fields.join('; ') : err.message}`);
  } finally {
    $('submit').disabled = false;
  }
});

$('api-key').value = localStorage.getItem(KEY_STORAGE) ?? '';
$('api-key').addEventListener('change', () => {
  if (apiKey()) localStorage.setItem(KEY_STORAGE, apiKey());
  else localStorage.removeItem(KEY_STORAGE);
  for (const controller of streams.values()) controller.abort();
  jobs.clear();
  void loadJobs();
});
$('forget-key').addEventListener('click', () => {
  $('api-key').value = '';
  $('api-key').dispatchEvent(new Event('change'));
});
$('viewer-close').addEventListener('click', () => $('viewer').close());
$('viewer').addEventListener('click', (event) => {
  if (event.target === $('viewer')) $('viewer').close(); // a click on the backdrop
});

void loadJobs();
