// Search over the tenant's indexed documents; a hit opens its passage.
import { getJson, el } from "./api.js";
import { openPassage } from "./passage.js";

export function setUpSearch() {
  const form = document.getElementById("search-form");
  const status = document.getElementById("search-status");
  const results = document.getElementById("search-results");
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const query = document.getElementById("search-query").value.trim();
    if (!query) return;
    const params = new URLSearchParams({ q: query, mode: document.getElementById("search-mode").value,
      top_k: document.getElementById("search-top-k").value || "5" });
    status.textContent = "Searching…";
    status.classList.remove("error");
    results.replaceChildren();
    try {
      const hits = (await getJson(`/v1/search?${params}`, { traced: `search "${query}"` })).data;
      status.textContent = hits.length ? `${hits.length} passage${hits.length > 1 ? "s" : ""} found` : "Nothing found.";
      results.replaceChildren(...hits.map((hit) => el("li", { "data-document-id": hit.document_id },
        el("button", { type: "button", class: "link", onclick: () => openPassage(hit.document_id, hit.title,
          [{ text: hit.text, start: hit.start_offset, end: hit.end_offset }], `chunk ${hit.chunk_id}`) },
          hit.title || hit.document_id),
        el("span", { class: "hint" }, ` · score ${Number(hit.score).toFixed(3)}`),
        el("p", { class: "snippet" }, hit.text.length > 320 ? `${hit.text.slice(0, 320)}…` : hit.text))));
    } catch (error) {
      status.textContent = `Search failed: ${error.message}`;
      status.classList.add("error");
    }
  });
}
