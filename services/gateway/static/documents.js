// Documents: drag-and-drop upload, live status from received to indexed (or failed, with its
// reason), delete, summarize.
import { call, getJson, el } from "./api.js";
import { openPassage } from "./passage.js";

const SETTLED = new Set(["indexed", "failed", "deleted"]);
const POLL_MS = 1000;
let documents = [];
let timer = null;
let lastStatuses = new Map();
const rendered = new Map();  // document id -> {key, element}: its row as last drawn

function say(message, isError = false) {
  const status = document.getElementById("documents-status");
  status.textContent = message;
  status.classList.toggle("error", isError);
}

function when(seconds) {
  return seconds ? new Date(seconds * 1000).toLocaleString() : "";
}

function row(document_) {
  const status = el("td", { class: "doc-status" },
    el("span", { class: `badge ${document_.status}`, "data-status": document_.status }, document_.status),
    document_.reason ? el("span", { class: "reason" }, document_.reason) : null);
  const actions = el("div", { class: "actions" },
    el("button", { type: "button", class: "secondary", disabled: document_.status !== "indexed", "aria-label": `Read ${document_.id}`,
      onclick: () => openPassage(document_.id, document_.id, []) }, "Read"),
    el("button", { type: "button", class: "secondary", disabled: document_.status !== "indexed", "aria-label": `Summarize ${document_.id}`,
      onclick: () => summarize(document_.id) }, "Summarize"),
    el("button", { type: "button", class: "danger", "aria-label": `Delete ${document_.id}`, onclick: () => remove(document_.id) }, "Delete"));
  return el("tr", { "data-document-id": document_.id },
    el("th", { scope: "row" }, document_.id), status, el("td", {}, String(document_.chunk_count || 0)),
    el("td", {}, when(document_.updated_at)), el("td", {}, actions));
}

// Rows are kept while their document is unchanged, so polling neither moves the focus of someone
// using the keyboard nor replaces the button under their pointer.
function renderRows(body) {
  const listed = new Set();
  const next = documents.map((document_) => {
    listed.add(document_.id);
    const key = JSON.stringify([document_.status, document_.reason, document_.chunk_count, document_.updated_at]);
    const known = rendered.get(document_.id);
    if (known && known.key === key) return known.element;
    const element = row(document_);
    rendered.set(document_.id, { key, element });
    return element;
  });
  for (const id of rendered.keys()) if (!listed.has(id)) rendered.delete(id);
  if (!next.length) next.push(el("tr", {}, el("td", { colspan: "5", class: "empty" }, "No documents yet: drop a file above.")));
  const current = Array.from(body.children);
  if (next.length === current.length && next.every((element, index) => element === current[index])) return;
  const focused = document.activeElement;
  body.replaceChildren(...next);
  if (focused && focused !== document.body && body.contains(focused)) focused.focus();
}

function render() {
  renderRows(document.getElementById("documents-body"));
  const select = document.getElementById("summary-document");
  const indexed = documents.filter((document_) => document_.status === "indexed").map((document_) => document_.id);
  if (indexed.join("\n") === Array.from(select.options, (option) => option.value).join("\n")) return;
  const chosen = select.value;
  select.replaceChildren(...indexed.map((id) => el("option", { value: id }, id)));
  if (indexed.includes(chosen)) select.value = chosen;
}

// Announces status changes (a document indexed or failed) in the live region.
function announce(previous) {
  const changes = [];
  for (const document_ of documents) {
    const before = previous.get(document_.id);
    if (before && before !== document_.status) {
      changes.push(`${document_.id}: ${document_.status}${document_.reason ? ` (${document_.reason})` : ""}`);
    }
  }
  if (changes.length) say(changes.join("; "), documents.some((document_) => document_.status === "failed" && previous.get(document_.id) !== "failed"));
}

export async function refreshDocuments() {
  try {
    const page = await getJson("/v1/documents?limit=200");
    documents = page.data;
    const previous = lastStatuses;
    lastStatuses = new Map(documents.map((document_) => [document_.id, document_.status]));
    announce(previous);
    render();
    const more = document.getElementById("documents-more");
    more.hidden = !page.has_more;
    more.textContent = page.has_more ? "Showing the first 200 documents (llmos docs list shows them all)." : "";
  } catch (error) {
    say(`Cannot list the documents: ${error.message}`, true);
  }
  schedule();
}

// Polls while a document is on its way to indexed or failed.
function schedule() {
  clearTimeout(timer);
  timer = null;
  if (documents.some((document_) => !SETTLED.has(document_.status))) timer = setTimeout(refreshDocuments, POLL_MS);
}

// A Markdown file's first heading, its title in answers' citations (else the file name is).
async function markdownTitle(file) {
  if (!/\.(md|markdown)$/i.test(file.name) || file.size > 1024 * 1024) return "";
  const heading = (await file.text()).match(/^#[ \t]+(.+?)[ \t#]*$/m);
  return heading ? heading[1] : "";
}

async function upload(files) {
  const tags = document.getElementById("upload-tags").value;
  for (const file of files) {
    const form = new FormData();
    form.append("file", file, file.name);
    form.append("document_id", file.name.replace(/\.[^.]+$/, "").toLowerCase().replace(/[^a-z0-9._-]+/g, "-"));
    if (tags.trim()) form.append("tags", tags);
    const title = await markdownTitle(file);
    if (title) form.append("title", title);
    say(`Uploading ${file.name}…`);
    try {
      const submitted = await (await call("/v1/documents", { method: "POST", form, traced: `upload ${file.name}` })).json();
      lastStatuses.set(submitted.id, submitted.status);
      say(submitted.unchanged ? `${file.name}: unchanged since it was last sent (${submitted.id})` : `${file.name}: ${submitted.status} as ${submitted.id}`);
    } catch (error) {
      say(`${file.name} was refused: ${error.message}`, true);
    }
  }
  await refreshDocuments();
}

async function remove(documentId) {
  if (!window.confirm(`Delete ${documentId}? Its chunks leave the index.`)) return;
  try {
    await call(`/v1/documents/${encodeURIComponent(documentId)}`, { method: "DELETE", traced: `delete ${documentId}` });
    say(`${documentId} deleted`);
  } catch (error) {
    say(`Cannot delete ${documentId}: ${error.message}`, true);
  }
  await refreshDocuments();
}

async function summarize(documentId) {
  const select = document.getElementById("summary-document");
  if (documentId) select.value = documentId;
  const output = document.getElementById("summary-output");
  const mode = document.getElementById("summary-mode").value;
  const words = Number(document.getElementById("summary-words").value) || 0;
  output.replaceChildren(el("p", { class: "status" }, `Summarizing ${select.value} (${mode})…`));
  output.scrollIntoView({ block: "nearest" });
  try {
    const summary = await (await call("/v1/summarize", {
      method: "POST", traced: `summarize ${select.value}`, json: { document_id: select.value, mode, target_words: words },
    })).json();
    const checked = summary.model_sentences ? ` · ${summary.supported_sentences} of ${summary.model_sentences} model sentences supported by the source` : "";
    output.replaceChildren(el("h4", {}, `Summary of ${select.value}`), el("p", {}, summary.summary),
      el("p", { class: "hint" }, `${summary.source_tokens} source tokens${checked}`));
  } catch (error) {
    output.replaceChildren(el("p", { class: "error" }, `Cannot summarize ${select.value}: ${error.message}`));
  }
}

export function setUpDocuments() {
  const zone = document.getElementById("drop-zone");
  const input = document.getElementById("upload-input");
  input.addEventListener("change", () => {
    upload(Array.from(input.files));
    input.value = "";
  });
  zone.addEventListener("dragover", (event) => {
    event.preventDefault();
    zone.classList.add("dragging");
  });
  zone.addEventListener("dragleave", () => zone.classList.remove("dragging"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("dragging");
    upload(Array.from(event.dataTransfer.files));
  });
  document.getElementById("summary-form").addEventListener("submit", (event) => {
    event.preventDefault();
    summarize("");
  });
}
