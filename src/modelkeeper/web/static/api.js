// Talking to the service: JSON calls and the event stream, both with the bearer token in a
// header. The token lives in sessionStorage (this tab only, gone with it), never in a URL, a
// cookie or the page. EventSource cannot send headers, so the stream is read with fetch().

const KEY = "modelkeeper.token";
let unauthorized = () => {};

export class ApiError extends Error {
  constructor(status, code, message, details) {
    super(message);
    this.status = status;
    this.code = code;
    this.details = details || {};
  }
}

export function onUnauthorized(fn) {
  unauthorized = fn;
}

export function hasToken() {
  return sessionStorage.getItem(KEY) !== null;
}

export function setToken(value) {
  sessionStorage.setItem(KEY, value);
}

export function forgetToken() {
  sessionStorage.removeItem(KEY);
}

function headers(extra) {
  const out = { Accept: "application/json", ...extra };
  const token = sessionStorage.getItem(KEY);
  if (token) out.Authorization = `Bearer ${token}`;
  return out;
}

function withQuery(path, query) {
  if (!query) return path;
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(query)) {
    if (v !== undefined && v !== null && v !== "") q.set(k, String(v));
  }
  const text = q.toString();
  return text ? `${path}?${text}` : path;
}

/** One API call: the parsed JSON answer, or an ApiError carrying the service's message. */
export async function api(path, { method = "GET", body, query } = {}) {
  const init = { method, headers: headers(), credentials: "omit", cache: "no-store" };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await fetch(withQuery(path, query), init);
  const text = await response.text();
  let data = null;
  if (text) {
    try {
      data = JSON.parse(text);
    } catch {
      data = { error: text };
    }
  }
  if (response.status === 401) unauthorized();
  if (!response.ok) {
    throw new ApiError(
      response.status,
      data?.error_code ?? `HTTP_${response.status}`,
      data?.error ?? response.statusText,
      data?.details,
    );
  }
  return data;
}

export function modelPath(id, tail = "") {
  return `/api/model/${encodeURIComponent(id)}${tail}`;
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/** The service's Server-Sent Events, read over fetch (so the token goes in a header), reconnected
 * with backoff. ``onEvent(type, data)`` gets each event; ``onState`` "live", "retrying", "locked". */
export class EventStream {
  constructor(path, onEvent, onState) {
    this.path = path;
    this.onEvent = onEvent;
    this.onState = onState;
    this.stopped = true;
    this.controller = null;
  }

  start() {
    if (!this.stopped) return;
    this.stopped = false;
    this.loop();
  }

  stop() {
    this.stopped = true;
    this.controller?.abort();
  }

  async loop() {
    let delay = 500;
    while (!this.stopped) {
      this.controller = new AbortController();
      try {
        const response = await fetch(this.path, {
          headers: headers({ Accept: "text/event-stream" }),
          credentials: "omit",
          cache: "no-store",
          signal: this.controller.signal,
        });
        if (response.status === 401) {
          this.stopped = true;
          this.onState("locked");
          unauthorized();
          return;
        }
        if (!response.ok || !response.body) throw new Error(`HTTP ${response.status}`);
        delay = 500;
        await this.read(response.body);
      } catch (err) {
        if (this.stopped) return;
      }
      this.onState("retrying");
      await sleep(delay);
      delay = Math.min(delay * 2, 10000);
    }
  }

  async read(body) {
    const reader = body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    let type = "message";
    let data = [];
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += value;
      let end;
      while ((end = buffer.indexOf("\n")) >= 0) {
        const line = buffer.slice(0, end).replace(/\r$/, "");
        buffer = buffer.slice(end + 1);
        if (line === "") {
          if (data.length) this.dispatch(type, data.join("\n"));
          type = "message";
          data = [];
        } else if (!line.startsWith(":")) {
          const colon = line.indexOf(":");
          const field = colon < 0 ? line : line.slice(0, colon);
          const val = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
          if (field === "event") type = val;
          else if (field === "data") data.push(val);
        }
      }
    }
  }

  dispatch(type, text) {
    let data;
    try {
      data = JSON.parse(text);
    } catch {
      return;
    }
    if (type === "hello") this.onState("live");
    this.onEvent(type, data);
  }
}
