// The assistant (model llmos-assistant): streamed answers, their citations and the hand-off.
import { call, events, el } from "./api.js";
import { openPassage } from "./passage.js";

const SESSION_STORAGE = "llmos.sessionId";
const ANSWER_PATHS = {
  ANSWER_PATH_DRAFT: "written by the model from the evidence, verified",
  ANSWER_PATH_EVIDENCE: "the evidence itself",
  ANSWER_PATH_SCRIPTED: "a scripted reply",
  ANSWER_PATH_DECLINED: "declined: the documents do not say",
};

export const conversation = {
  get sessionId() { return sessionStorage.getItem(SESSION_STORAGE) || ""; },
  set sessionId(value) {
    if (value) sessionStorage.setItem(SESSION_STORAGE, value);
    else sessionStorage.removeItem(SESSION_STORAGE);
    const label = document.getElementById("session-label");
    if (label) label.textContent = value ? `Conversation ${value.slice(0, 8)}…` : "";
  },
};

// The grounding sentences that support `citation`: the passages to highlight when it is opened.
function passagesOf(turn, documentId, chunkId) {
  const sentences = (turn.grounding && turn.grounding.sentences) || [];
  return sentences
    .filter((sentence) => sentence.document_id === documentId && (!chunkId || sentence.chunk_id === chunkId))
    .map((sentence) => ({ text: sentence.source_text }));
}

function citationButton(turn, citation, label, className) {
  return el("button", {
    type: "button", class: className, "data-document-id": citation.document_id,
    "aria-label": `Open source ${label}: ${citation.title || citation.document_id}`,
    onclick: () => {
      let passages = passagesOf(turn, citation.document_id, citation.chunk_id);
      if (!passages.length) passages = passagesOf(turn, citation.document_id, "");
      openPassage(citation.document_id, citation.title, passages, citation.chunk_id ? `chunk ${citation.chunk_id}` : "");
    },
  }, label);
}

// Sends `text` as the next turn of the conversation and renders the answer into `log` as it
// streams. Returns {answer, citations, handoff}.
export async function askAssistant(log, text, traceLabel = "chat turn") {
  log.querySelector(".empty")?.remove();
  log.append(el("div", { class: "message user" }, el("span", { class: "visually-hidden" }, "You: "), text));
  const answer = el("p", { class: "answer" });
  const meta = el("p", { class: "meta" });
  const article = el("article", { class: "message assistant", "aria-busy": "true" },
    el("span", { class: "visually-hidden" }, "Assistant: "), answer, meta);
  log.append(article);
  log.scrollTop = log.scrollHeight;
  const turn = { numbers: new Map(), citations: [], grounding: null, handoff: false, intent: null, text: "" };
  const numberOf = (citation) => {
    if (!turn.numbers.has(citation.document_id)) turn.numbers.set(citation.document_id, turn.numbers.size + 1);
    return turn.numbers.get(citation.document_id);
  };
  meta.textContent = "thinking…";
  try {
    const response = await call("/v1/chat/completions", {
      method: "POST", traced: traceLabel,
      json: { model: "llmos-assistant", stream: true, messages: [{ role: "user", content: text }], session_id: conversation.sessionId || undefined },
    });
    for await (const chunk of events(response)) {
      if (chunk.session_id && chunk.session_id !== conversation.sessionId) conversation.sessionId = chunk.session_id;
      if (chunk.intent) turn.intent = chunk.intent;
      const choice = (chunk.choices || [])[0];
      const delta = choice && choice.delta && choice.delta.content;
      if (delta) {
        answer.append(delta);
        turn.text += delta;
        meta.textContent = "answering…";
      }
      if (chunk.citation) {
        const number = numberOf(chunk.citation);
        answer.append(citationButton(turn, chunk.citation, `[${number}]`, "cite secondary"));
      }
      if (chunk.citations) turn.citations = chunk.citations;
      if (chunk.grounding) turn.grounding = chunk.grounding;
      if (chunk.handoff) turn.handoff = true;
      log.scrollTop = log.scrollHeight;
    }
    if (turn.citations.length) {
      const sources = el("div", { class: "sources" }, el("span", {}, "Sources:"));
      for (const citation of turn.citations) {
        sources.append(citationButton(turn, citation, `[${numberOf(citation)}] ${citation.title || citation.document_id}`, "secondary source"));
      }
      article.append(sources);
    }
    if (turn.handoff) {
      article.append(el("div", { class: "handoff", role: "note" },
        el("strong", {}, "Hand-off: "), "the assistant could not answer this and offered a person from the support team."));
    }
    const details = [];
    if (turn.intent && turn.intent.name) details.push(`intent ${turn.intent.name} (${Number(turn.intent.confidence || 0).toFixed(2)})`);
    if (turn.grounding && ANSWER_PATHS[turn.grounding.path]) details.push(ANSWER_PATHS[turn.grounding.path]);
    if (turn.grounding && turn.grounding.conflict) details.push("the sources disagree: both are cited");
    meta.textContent = details.join(" · ");
    return { answer: turn.text, citations: turn.citations, handoff: turn.handoff };
  } catch (error) {
    article.classList.add("error");
    meta.textContent = `The answer failed: ${error.message}`;
    throw error;
  } finally {
    article.setAttribute("aria-busy", "false");
    log.scrollTop = log.scrollHeight;
  }
}

export function setUpChat() {
  const form = document.getElementById("chat-form");
  const input = document.getElementById("chat-input");
  const send = document.getElementById("chat-send");
  const log = document.getElementById("chat-log");
  conversation.sessionId = conversation.sessionId;
  input.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      form.requestSubmit();
    }
  });
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const text = input.value.trim();
    if (!text || send.disabled) return;
    input.value = "";
    send.disabled = true;
    try {
      await askAssistant(log, text);
    } catch (_) { /* shown in the answer */ } finally {
      send.disabled = false;
      input.focus();
    }
  });
  document.getElementById("new-session").addEventListener("click", async () => {
    const ending = conversation.sessionId;
    conversation.sessionId = "";
    log.replaceChildren(el("p", { class: "empty", id: "chat-empty" }, "A new conversation: ask away."));
    if (ending) {
      try { await call(`/v1/sessions/${encodeURIComponent(ending)}`, { method: "DELETE" }); } catch (_) { /* ended by its TTL anyway */ }
    }
    input.focus();
  });
}
