// The trace of the last request made from this page: its span tree (service, span, duration)
// from the gateway's span file, or a link to Jaeger when spans go to a collector.
import { getJson, lastRequest, el } from "./api.js";

const ATTEMPTS = 8;
const RETRY_MS = 700;

function say(message, isError = false) {
  const status = document.getElementById("trace-status");
  status.textContent = message;
  status.classList.toggle("error", isError);
}

function describeRequest() {
  const label = document.getElementById("trace-request");
  label.textContent = lastRequest.traceId
    ? `Last request: ${lastRequest.label} at ${lastRequest.at.toLocaleTimeString()} (trace ${lastRequest.traceId})`
    : "No request yet: chat, upload, search or summarize first.";
}

function render(spans) {
  const table = document.getElementById("trace-table");
  const total = Math.max(...spans.map((span) => span.offset_ms + span.duration_ms), 1);
  const rows = spans.map((span) => {
    const bar = el("span", { class: "bar", "aria-hidden": "true" });
    bar.style.left = `${(100 * span.offset_ms) / total}%`;
    bar.style.width = `${(100 * span.duration_ms) / total}%`;
    const indent = el("span", { class: "indent", "aria-hidden": "true" });
    indent.style.width = `${span.depth * 1.1}rem`;
    const failed = span.status === "ERROR";
    return el("tr", { class: failed ? "span-error" : "", "data-service": span.service },
      el("td", { class: "span-name" }, indent, el("span", { class: "visually-hidden" }, `depth ${span.depth}: `), span.name,
        failed ? el("span", { class: "reason" }, `error: ${span.status_message || "failed"}`) : null),
      el("td", {}, span.service),
      el("td", {}, `${span.duration_ms.toFixed(1)} ms`),
      el("td", { title: `starts at +${span.offset_ms.toFixed(1)} ms` }, el("div", { class: "bar-track" }, bar)));
  });
  document.getElementById("trace-body").replaceChildren(...rows);
  table.hidden = false;
}

export async function showTrace() {
  describeRequest();
  const table = document.getElementById("trace-table");
  const link = document.getElementById("trace-link");
  if (!lastRequest.traceId) return;
  const traceId = lastRequest.traceId;
  table.hidden = true;
  link.hidden = true;
  say("Reading the spans…");
  let found = 0;
  // Each process writes its spans about half a second after they end: read until they stop coming.
  for (let attempt = 0; attempt < ATTEMPTS && traceId === lastRequest.traceId; attempt += 1) {
    try {
      const trace = await getJson(`/v1/traces/${traceId}`);
      if (trace.jaeger_url) {
        link.replaceChildren("Spans go to the OpenTelemetry collector: ",
          el("a", { href: trace.jaeger_url, target: "_blank", rel: "noopener noreferrer" }, "open this trace in Jaeger"));
        link.hidden = false;
        say("");
        return;
      }
      render(trace.spans);
      const services = new Set(trace.spans.map((span) => span.service)).size;
      say(`${trace.spans.length} spans in ${services} service${services > 1 ? "s" : ""}`);
      if (trace.spans.length === found && attempt > 0) return;
      found = trace.spans.length;
    } catch (error) {
      if (error.status !== 404) {
        say(error.status === 403 ? `The trace view is for administrators: ${error.message}` : `Cannot read the trace: ${error.message}`, true);
        return;
      }
      say("Waiting for the spans to be written…");
    }
    await new Promise((resolve) => { setTimeout(resolve, RETRY_MS); });
  }
  if (!found) say("No spans of this request were found.", true);
}

export function setUpTrace() {
  lastRequest.listeners.push(describeRequest);
  document.getElementById("trace-refresh").addEventListener("click", showTrace);
}
