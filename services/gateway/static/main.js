// The console's shell: sign-in with an API key, the tabs, and each section's set-up.
import { getJson, session, whenUnauthenticated } from "./api.js";
import { setUpChat } from "./chat.js";
import { refreshDocuments, setUpDocuments } from "./documents.js";
import { setUpPassageDialog } from "./passage.js";
import { setUpSearch } from "./search.js";
import { showTrace, setUpTrace } from "./trace.js";
import { loadVoices, setUpVoice } from "./voice.js";

const $ = (id) => document.getElementById(id);
const TABS = ["chat", "documents", "search", "voice", "trace"];
const ON_OPEN = { documents: refreshDocuments, voice: loadVoices, trace: showTrace };

function selectTab(name, focus = false) {
  for (const tab of TABS) {
    const selected = tab === name;
    const button = $(`tab-${tab}`);
    button.setAttribute("aria-selected", String(selected));
    button.tabIndex = selected ? 0 : -1;
    $(`panel-${tab}`).hidden = !selected;
    if (selected && focus) button.focus();
  }
  if (ON_OPEN[name]) ON_OPEN[name]();
  if (name === "chat") $("chat-input").focus();
}

function setUpTabs() {
  const list = $("tabs");
  list.addEventListener("click", (event) => {
    const tab = event.target.closest("[role=tab]");
    if (tab) selectTab(tab.id.replace("tab-", ""));
  });
  // Arrow keys, Home and End move between tabs (WAI-ARIA tabs pattern).
  list.addEventListener("keydown", (event) => {
    const current = TABS.indexOf(document.activeElement.id.replace("tab-", ""));
    if (current < 0) return;
    const moves = { ArrowRight: current + 1, ArrowLeft: current - 1, Home: 0, End: TABS.length - 1 };
    if (!(event.key in moves)) return;
    event.preventDefault();
    selectTab(TABS[(moves[event.key] + TABS.length) % TABS.length], true);
  });
}

function showSignIn(message = "") {
  $("console").hidden = true;
  $("identity").hidden = true;
  $("sign-out").hidden = true;
  $("sign-in").hidden = false;
  $("sign-in-error").textContent = message;
  $("api-key").focus();
}

async function enter() {
  try {
    const me = await getJson("/v1/me");
    $("identity").textContent = `${me.subject} · tenant ${me.tenant} · ${me.roles.join(", ") || "no role"}`;
    $("identity").hidden = false;
    $("sign-out").hidden = false;
    $("sign-in").hidden = true;
    $("console").hidden = false;
    selectTab("chat");
  } catch (error) {
    session.key = "";
    showSignIn(error.status === 401 ? `This key was refused: ${error.message}` : `Cannot sign in: ${error.message}`);
  }
}

function start() {
  setUpTabs();
  setUpPassageDialog();
  setUpChat();
  setUpDocuments();
  setUpSearch();
  setUpVoice();
  setUpTrace();
  whenUnauthenticated((error) => {
    session.key = "";
    showSignIn(`Signed out: ${error.message}`);
  });
  $("sign-in-form").addEventListener("submit", (event) => {
    event.preventDefault();
    session.key = $("api-key").value.trim();
    $("api-key").value = "";
    enter();
  });
  $("sign-out").addEventListener("click", () => {
    session.key = "";
    sessionStorage.clear();
    showSignIn("Signed out.");
  });
  if (session.key) enter();
  else showSignIn();
}

start();
