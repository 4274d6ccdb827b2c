// A chat completion stream that survives dropped connections, reloads and closed tabs.
//
// The server keeps every answer as a log of numbered events (`id: <session>:<index>`) and
// replays it after any index. So a client only has to remember the session id and the
// last event id it has handled (the page keeps both in localStorage) and ask for the rest:
//   GET /v1/chat/completions/<session>?stream=true   with   Last-Event-ID: <session>:<index>
// fetch() with a streaming body reader is used rather than EventSource because it can
// send the Authorization header; a client that must use EventSource passes the
// session's read token instead (`?read_token=`, from the X-Read-Token response header).
// Design notes: CLAUDE.md D39 (this client) and D37 (read tokens).

export class HTTPError extends Error {
  constructor(status, body) {
    super(body?.error?.message || `HTTP ${status}`);
    this.status = status;
    this.body = body;
  }
}

const RETRY_MS = [250, 500, 1000, 2000, 3000];
const SILENCE_MS = 45000;  // the server pings every SSE_PING_SECONDS (15 s by default)

// SSE events {id, data} from a fetch Response, as they arrive.
export async function* sseEvents(response, onBytes) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let event = { data: [] };
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      onBytes?.();
      buffer += value;
      let end;
      while ((end = buffer.search(/\r\n|\r|\n/)) >= 0) {
        if (end === buffer.length - 1 && buffer[end] === "\r") break;  // maybe the first half of \r\n
        const line = buffer.slice(0, end);
        buffer = buffer.slice(end + (buffer.startsWith("\r\n", end) ? 2 : 1));
        if (line === "") {
          if (event.data.length) yield { id: event.id, data: event.data.join("\n") };
          event = { data: [] };
        } else if (!line.startsWith(":")) {
          const colon = line.indexOf(":");
          const field = colon < 0 ? line : line.slice(0, colon);
          const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
          if (field === "data") event.data.push(value);
          else if (field === "id") event.id = value;
        }
      }
    }
  } finally {
    reader.cancel().catch(() => {});
  }
}

export function eventIndex(id) {
  const i = id ? id.lastIndexOf(":") : -1;
  return i < 0 ? NaN : Number(id.slice(i + 1));
}

async function errorBody(response) {
  try {
    return await response.json();
  } catch {
    return null;
  }
}

// One answer, followed to its [DONE] across as many connections as it takes.
//
// callbacks: onEvent({index, data}) for each new event in order (never a gap, never a
// duplicate), onState("connecting" | "streaming" | "reconnecting" | "busy" | "waiting-key"),
// headers() -> the request headers (the API key, read when each request is made).
export class ResumableStream {
  constructor({ sessionId, lastIndex = -1, body = null, headers, onEvent, onState }) {
    Object.assign(this, { sessionId, lastIndex, body, headers, onEvent, onState });
    this.stopped = false;
    this.controller = null;
    this.wake = null;
  }

  // Resolves when [DONE] was handled (or stop() was called); rejects with an HTTPError
  // when the server refuses the request or no longer has the answer.
  async run() {
    for (let attempt = 0; !this.stopped; attempt++) {
      this.busy = false;
      try {
        const response = await this.connect();
        attempt = 0;
        if (response.status === 204) return;  // nothing follows the event we already have
        if (await this.read(response)) return;
      } catch (error) {
        if (error instanceof HTTPError && !(await this.recoverable(error))) throw error;
      }
      if (this.stopped) return;
      this.onState(this.busy ? "busy" : "reconnecting");
      await this.pause(RETRY_MS[Math.min(attempt, RETRY_MS.length - 1)]);
    }
  }

  // The first request posts the body; every later one resumes after the last event.
  async connect() {
    this.controller = new AbortController();
    this.onState(this.body ? "connecting" : "reconnecting");
    if (this.body) this.posts = (this.posts || 0) + 1;
    const init = { headers: this.headers(), signal: this.controller.signal, cache: "no-store" };
    const response = this.body
      ? await fetch("/v1/chat/completions", { ...init, method: "POST", body: this.body,
        headers: { ...init.headers, "Content-Type": "application/json" } })
      : await fetch(`/v1/chat/completions/${encodeURIComponent(this.sessionId)}?stream=true`,
        { ...init, headers: { ...init.headers, "Last-Event-ID": `${this.sessionId}:${this.lastIndex}` } });
    if (!response.ok) throw new HTTPError(response.status, await errorBody(response));
    this.body = null;  // the server has the request: never post it twice
    return response;
  }

  // Handles events until [DONE] (true) or until the connection ends early (false).
  async read(response) {
    this.onState("streaming");
    let timer = null;
    const watchdog = () => {
      clearTimeout(timer);
      timer = setTimeout(() => this.controller.abort(), SILENCE_MS);
    };
    watchdog();
    try {
      for await (const event of sseEvents(response, watchdog)) {
        const index = eventIndex(event.id);
        if (!(index > this.lastIndex)) continue;  // already handled
        if (index !== this.lastIndex + 1) return false;  // a gap: ask again from what we have
        this.lastIndex = index;
        this.onEvent({ index, data: event.data });
        if (event.data === "[DONE]") return true;
      }
      return false;
    } catch {
      return this.stopped;  // unless stopped on purpose, the network went away: resume
    } finally {
      clearTimeout(timer);
    }
  }

  // What to do when the server answers a resume with an error.
  async recoverable(error) {
    if (error.status === 401) {
      this.onState("waiting-key");
      await new Promise((resolve) => { this.keyGiven = resolve; });
      return true;
    }
    if (error.status === 409 && this.body !== null && this.posts > 1) {
      this.body = null;  // an earlier try of this POST did reach the server: follow that one
      return true;
    }
    // A POST is tried again only when the server says "not now" (model loading, queue
    // full); a resume also rides out other 5xx (a proxy while the server restarts).
    this.busy = error.status === 503 || error.status === 429;
    return this.busy || (this.body === null && error.status >= 500);
  }

  // Ends a wait early: the network is back, the page became visible, or a key was entered.
  nudge() {
    this.wake?.();
    if (this.keyGiven) {
      const resume = this.keyGiven;
      this.keyGiven = null;
      resume();
    }
  }

  pause(ms) {
    return new Promise((resolve) => {
      const timer = setTimeout(resolve, ms * (0.8 + Math.random() * 0.4));
      this.wake = () => { clearTimeout(timer); resolve(); };
    });
  }

  stop() {
    this.stopped = true;
    this.controller?.abort();
    this.nudge();
  }
}
