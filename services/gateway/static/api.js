// Calls to the gateway: the API key from this tab's session storage, errors as ApiError with
// the gateway's message, server-sent events read from a streamed fetch, and a trace started by
// the console for each request a person makes, so the trace view can show that request.

const KEY_STORAGE = "llmos.apiKey";

export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

export const session = {
  get key() { return sessionStorage.getItem(KEY_STORAGE) || ""; },
  set key(value) {
    if (value) sessionStorage.setItem(KEY_STORAGE, value);
    else sessionStorage.removeItem(KEY_STORAGE);
  },
};

// The last request a person made: its W3C trace id, what it was, when.
export const lastRequest = { traceId: "", label: "", at: null, listeners: [] };

let onUnauthenticated = () => {};
export function whenUnauthenticated(callback) { onUnauthenticated = callback; }

function hex(bytes) {
  return Array.from(crypto.getRandomValues(new Uint8Array(bytes)), (b) => b.toString(16).padStart(2, "0")).join("");
}

function startTrace(label) {
  const traceId = hex(16);
  lastRequest.traceId = traceId;
  lastRequest.label = label;
  lastRequest.at = new Date();
  for (const listener of lastRequest.listeners) listener();
  // version 00, a parent span id of the page's own, sampled
  return `00-${traceId}-${hex(8)}-01`;
}

async function errorOf(response) {
  let message = `${response.status} ${response.statusText}`;
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) message = body.error.message;
  } catch (_) { /* not JSON: keep the status line */ }
  return new ApiError(response.status, message);
}

// fetch with the key; `traced` names the request in the trace view (polling passes nothing).
export async function call(path, { method = "GET", json, form, traced = "", headers = {}, signal } = {}) {
  const sent = { ...headers, Authorization: `Bearer ${session.key}` };
  let body;
  if (json !== undefined) {
    sent["Content-Type"] = "application/json";
    body = JSON.stringify(json);
  } else if (form !== undefined) {
    body = form;
  }
  if (traced) sent.traceparent = startTrace(traced);
  let response;
  try {
    response = await fetch(path, { method, headers: sent, body, signal, cache: "no-store" });
  } catch (error) {
    if (error.name === "AbortError") throw error;
    throw new ApiError(0, `the gateway cannot be reached (${error.message})`);
  }
  if (!response.ok) {
    const error = await errorOf(response);
    if (response.status === 401) onUnauthenticated(error);
    throw error;
  }
  return response;
}

export async function getJson(path, options) {
  return (await call(path, options)).json();
}

// Each `data:` event of a text/event-stream response, parsed, until `[DONE]`; an error event
// (the answer failed half-way) is thrown as ApiError.
export async function* events(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += value.replace(/\r\n/g, "\n");
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        const data = block.split("\n").filter((line) => line.startsWith("data:")).map((line) => line.slice(5).trimStart()).join("\n");
        if (!data) continue;
        if (data === "[DONE]") return;
        const event = JSON.parse(data);
        if (event.error) throw new ApiError(500, event.error.message || "the answer failed");
        yield event;
      }
    }
  } finally {
    reader.releaseLock();
  }
}

// A small element builder: text is always set as text, never parsed as markup.
export function el(tag, attributes = {}, ...children) {
  const element = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (value === undefined || value === null || value === false) continue;
    if (name === "class") element.className = value;
    else if (name === "text") element.textContent = value;
    else if (name.startsWith("on")) element.addEventListener(name.slice(2), value);
    else element.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    element.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return element;
}
