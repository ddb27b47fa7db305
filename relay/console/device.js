// The device page: the stand-in for the instrument's touchscreen. It polls the
// agent's local API (/api/state) every second, shows the offer with Allow and
// Deny, then the session's countdown, its warnings and the End button, and
// after an end the reason in words. Same look, countdown and wording as the
// engineers' console (common.js, end-wording.js). Below, the monitoring feed's
// recent data requests: who read the configuration or consumables, and when.

import { DEVICE_END_WORDING } from "./end-wording.js";
import { Countdown, byId, endWords, setText, show, span, warningText } from "./common.js";

const POLL_MS = 1000;

const page = {
  current: null, // the session id the buttons answer
  shown: null, // "idle" | "offer" | "session"
  denied: null, // the offer this page denied
  lastNote: null, // what became of an offer that never became a session
  answerLeft: new Countdown("offer-deadline"),
  timeLeft: new Countdown("session-countdown"),
};

/** Restart a countdown only when the agent's figure moved (no jitter). */
function follow(countdown, secondsLeft) {
  const endMs = Date.now() + secondsLeft * 1000;
  if (countdown.endMs === null || Math.abs(countdown.endMs - endMs) > 1500) countdown.start(endMs);
}

function showSection(name, titleId) {
  for (const section of ["idle", "offer", "session"]) show(section, section === name);
  if (page.shown !== name) {
    page.shown = name;
    byId(titleId).focus();
  }
}

function renderOffer(offer) {
  if (page.current !== offer.session_id) {
    setText("status", `Remote access requested by ${offer.engineer}.`);
  }
  page.current = offer.session_id;
  setText("offer-engineer", offer.engineer);
  setText("offer-role", offer.engineer_role || "");
  show("offer-role-row", Boolean(offer.engineer_role));
  setText("offer-reason", offer.reason);
  setText("offer-channels", offer.channels.join(", "));
  setText("offer-refused", offer.refused_channels.join(", "));
  show("offer-refused-row", offer.refused_channels.length > 0);
  setText("offer-duration", `at most ${span(offer.max_seconds)}`);
  follow(page.answerLeft, offer.seconds_to_answer);
  showSection("offer", "offer-title");
}

function renderSession(session) {
  if (page.current !== session.session_id || page.shown !== "session") {
    setText("status", `Remote session with ${session.engineer} in progress.`);
  }
  page.current = session.session_id;
  page.answerLeft.stop();
  const role = session.engineer_role ? ` (${session.engineer_role})` : "";
  setText("session-engineer", session.engineer + role);
  setText("session-reason", session.reason);
  setText("session-channels", session.channels.join(", "));
  if (session.seconds_left === null) {
    page.timeLeft.stop();
    setText("session-countdown", "starting");
  } else {
    follow(page.timeLeft, session.seconds_left);
  }
  const warned = Number.isFinite(session.warning_seconds) && session.warning_seconds > 0;
  if (warned) setText("session-warning", warningText(session.warning_seconds));
  show("session-warning", warned);
  showSection("session", "session-title");
}

function renderIdle(lastEnd) {
  // The agent reports how sessions ended; an offer that never became one (denied
  // here, withdrawn, unanswered) is remembered by this page.
  if (page.shown === "offer") {
    page.lastNote =
      page.denied === page.current
        ? `Last request: ${endWords(DEVICE_END_WORDING, "denied")}.`
        : "Last request: withdrawn, or not answered in time.";
  } else if (page.shown === "session") {
    page.lastNote = null;
  }
  let words = page.lastNote;
  if (words === null && lastEnd) words = `Last session: ${endWords(DEVICE_END_WORDING, lastEnd.reason)}.`;
  if (page.shown !== null && page.shown !== "idle" && words) setText("status", words);
  page.current = null;
  page.answerLeft.stop();
  page.timeLeft.stop();
  setText("last-end", words ?? "");
  showSection("idle", "idle-title");
}

const KIND_WORDS = { configuration: "configuration", consumables: "consumables status" };

/** The monitoring feed's data requests: who asked for what, when, and the answer. */
function renderDataRequests(requests) {
  const list = byId("data-requests-list");
  const items = (requests ?? []).map((request) => {
    const item = document.createElement("li");
    const when = new Date(request.at).toLocaleString();
    const who = request.requester_role ? `${request.requested_by} (${request.requester_role})` : request.requested_by || "nobody named";
    const why = request.reason ? ` for "${request.reason}"` : "";
    // Text only: the names and the reason come from the network.
    item.textContent = `${when}: ${who} asked for the ${KIND_WORDS[request.kind] ?? request.kind}${why}; ${request.words}.`;
    return item;
  });
  list.replaceChildren(...items);
  show("data-requests", items.length > 0);
}

async function refresh() {
  let state;
  try {
    const response = await fetch("/api/state", { cache: "no-store" });
    state = await response.json();
  } catch {
    setText("error", "The agent does not answer.");
    return;
  }
  setText("error", "");
  renderDataRequests(state.data_requests);
  if (state.offer) renderOffer(state.offer);
  else if (state.session) renderSession(state.session);
  else renderIdle(state.last_end);
}

async function answer(action) {
  if (page.current === null) return;
  let ok = false;
  try {
    const response = await fetch(`/api/${action}`, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ session_id: page.current }),
    });
    ok = response.ok;
  } catch {
    ok = false;
  }
  if (ok && action === "deny") page.denied = page.current;
  setText("error", ok ? "" : "That request is no longer current.");
  await refresh();
}

function start() {
  byId("grant").addEventListener("click", () => answer("grant"));
  byId("deny").addEventListener("click", () => answer("deny"));
  byId("end").addEventListener("click", () => answer("end"));
  refresh();
  setInterval(refresh, POLL_MS);
}

start();
