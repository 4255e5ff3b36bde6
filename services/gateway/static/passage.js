// The passage dialog: a cited or found document's text with the passage highlighted.
import { getJson, el } from "./api.js";

const dialog = () => document.getElementById("passage");

// Where `needle` is in `text`: exactly, else with any run of whitespace for a space (a quoted
// sentence has its line breaks joined).
function locate(text, needle) {
  if (!needle) return null;
  const at = text.indexOf(needle);
  if (at >= 0) return [at, at + needle.length];
  const words = needle.split(/\s+/).map((word) => word.replace(/[.*+?^${}()|[\]\\]/g, "\\$&"));
  const match = new RegExp(words.join("\\s+")).exec(text);
  return match ? [match.index, match.index + match[0].length] : null;
}

// Character ranges of each passage in the text: exact offsets when given, else where it occurs.
function ranges(text, passages) {
  const found = [];
  for (const passage of passages) {
    if (Number.isInteger(passage.start) && Number.isInteger(passage.end) && passage.end > passage.start
        && (!passage.text || text.slice(passage.start, passage.end) === passage.text)) {
      found.push([passage.start, passage.end]);
      continue;
    }
    const range = locate(text, (passage.text || "").trim());
    if (range) found.push(range);
  }
  found.sort((a, b) => a[0] - b[0]);
  const merged = [];
  for (const range of found) {
    const last = merged[merged.length - 1];
    if (last && range[0] <= last[1]) last[1] = Math.max(last[1], range[1]);
    else merged.push([...range]);
  }
  return merged;
}

function highlighted(text, marked) {
  const parts = [];
  let position = 0;
  for (const [start, end] of marked) {
    parts.push(text.slice(position, start), el("mark", {}, text.slice(start, end)));
    position = end;
  }
  parts.push(text.slice(position));
  return parts;
}

// Opens the dialog for `documentId`; `passages` are {text, start, end} to highlight.
export async function openPassage(documentId, title, passages, detail = "") {
  const box = dialog();
  const body = document.getElementById("passage-text");
  document.getElementById("passage-title").textContent = title || documentId;
  document.getElementById("passage-meta").textContent = `Document ${documentId}${detail ? ` · ${detail}` : ""} · loading…`;
  body.replaceChildren();
  if (!box.open) box.showModal();
  try {
    const document_ = await getJson(`/v1/documents/${encodeURIComponent(documentId)}?include_content=true`);
    const text = document_.content || "";
    if (!text) {
      document.getElementById("passage-meta").textContent = `Document ${documentId} is ${document_.status}: its text is readable once it is indexed.`;
      return;
    }
    const marked = ranges(text, passages);
    body.replaceChildren(...highlighted(text, marked));
    const where = marked.length ? `${marked.length} passage${marked.length > 1 ? "s" : ""} highlighted` : "the whole document";
    document.getElementById("passage-meta").textContent = `Document ${documentId}${detail ? ` · ${detail}` : ""} · ${where}`;
    const first = body.querySelector("mark");
    if (first) first.scrollIntoView({ block: "center" });
  } catch (error) {
    document.getElementById("passage-meta").textContent = `Cannot open ${documentId}: ${error.message}`;
  }
}

export function setUpPassageDialog() {
  document.getElementById("passage-close").addEventListener("click", () => dialog().close());
  // A click on the backdrop closes it too (Escape does, natively).
  dialog().addEventListener("click", (event) => { if (event.target === dialog()) dialog().close(); });
}
