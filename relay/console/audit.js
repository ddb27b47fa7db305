// The auditors' pages of the console: the remote sessions of the audit log,
// filtered, and one session in detail (its facts, its timeline of audit
// records, the receipts the instrument signed, and its recordings, the shell
// ones played back with asciinema-player).
//
// Security rules this file keeps (as console.js does):
// - Everything the API answers is untrusted text (reasons, user names, audit
//   fields, receipts, recording names): it goes into the page with textContent
//   or as an attribute value, never as HTML.
// - Recording URLs are built from the session id and the recording name with
//   encodeURIComponent. The player and the download links fetch them from this
//   page's own origin; the session cookie authenticates the GET, and no token
//   ever goes into a URL.
// - The player (vendor/asciinema-player/) is imported on first use, so that
//   engineers' pages never load it. Its terminal emulator is WebAssembly, which
//   is why the page's CSP allows 'wasm-unsafe-eval' (see CONSOLE_CSP in
//   relay/_trio/engineer_middleware.py).

import { AUDIT_END_WORDING } from "./end-wording.js";
import { byId, clock, endWords, setText, show } from "./common.js";

const SESSIONS_PATH = "/api/v1/audit/sessions";
const PLAYER_MODULE = "./vendor/asciinema-player/index.js";
/** Roles that may read the audit log (GET /api/v1/audit/...). */
export const AUDIT_ROLES = new Set(["auditor", "admin"]);
/** Pauses longer than this (seconds) are shortened in playback. */
const IDLE_TIME_LIMIT_S = 2;
/** The filter fields and the query parameter each one sets. */
const FILTERS = [
  ["audit-device", "device_id"],
  ["audit-engineer", "engineer"],
  ["audit-since", "since"],
  ["audit-until", "until"],
  ["audit-end-reason", "end_reason"],
  ["audit-limit", "limit"],
];

function sessionPath(sessionId) {
  return `${SESSIONS_PATH}/${encodeURIComponent(sessionId)}`;
}

function recordingUrl(sessionId, name) {
  return `${sessionPath(sessionId)}/recordings/${encodeURIComponent(name)}`;
}

/** An ISO 8601 time as "2026-05-04 13:02:11" (UTC); the text as given if it is not one. */
function utcText(iso) {
  if (typeof iso !== "string") return "";
  const ms = Date.parse(iso);
  if (!Number.isFinite(ms)) return iso;
  return new Date(ms).toISOString().slice(0, 19).replace("T", " ");
}

/** A datetime-local value, read as UTC, in ISO 8601 ("2026-05-04T13:02:00Z"). */
function utcIso(value) {
  if (value === "") return "";
  const withSeconds = value.length === 16 ? `${value}:00` : value;
  return `${withSeconds}Z`;
}

function bytesText(count) {
  if (!Number.isFinite(count)) return "";
  if (count < 1024) return `${count} B`;
  if (count < 1024 * 1024) return `${(count / 1024).toFixed(1)} KiB`;
  return `${(count / (1024 * 1024)).toFixed(1)} MiB`;
}

function durationText(session) {
  if (Number.isFinite(session.duration_s)) return clock(session.duration_s);
  return session.ended_at === null ? "live" : "";
}

function endText(session) {
  if (session.ended_at === null || session.ended_at === undefined) return "still live";
  const reason = session.end_reason;
  if (typeof reason !== "string" || reason === "") return "ended";
  return endWords(AUDIT_END_WORDING, reason);
}

function element(tag, text, className) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (className) node.className = className;
  return node;
}

function cell(text, className) {
  return element("td", text, className);
}

/** One value of an audit record as text: strings as they are, the rest as JSON. */
function fieldText(value) {
  return typeof value === "string" ? value : JSON.stringify(value);
}

function list(value) {
  return Array.isArray(value) ? value : [];
}

/** One direction of a forward in forwards.json: {bytes, sha256}, or empty values. */
function direction(value) {
  const totals = value !== null && typeof value === "object" ? value : {};
  return { bytes: totals.bytes, sha256: typeof totals.sha256 === "string" ? totals.sha256 : "" };
}

function downloadLink(sessionId, recording) {
  const link = element("a", `Download ${recording.name}`);
  link.href = recordingUrl(sessionId, recording.name);
  link.download = recording.name;
  return link;
}

/** "12.3 KiB, SHA-256 ab12...", with the digest in full (an auditor compares it). */
function recordingFacts(recording) {
  const facts = element("p", null, "help recording-facts");
  facts.append(`${bytesText(recording.size_bytes)}, SHA-256 `);
  facts.append(element("code", recording.sha256, "digest"));
  return facts;
}

/**
 * The audit pages. console.js owns the views, the API helper and the status
 * line, and hands them in; this class owns the two audit views' contents.
 */
export class AuditPages {
  constructor({ api, say, showView, loginEnded }) {
    this.api = api;
    this.say = say;
    this.showView = showView;
    this.loginEnded = loginEnded;
    this.role = null;
    this.sessions = [];
    this.players = [];
    // Answers that arrive after the auditor moved on are dropped.
    this.generation = 0;
    this.playerModule = null;
    this.openedFrom = null; // the session id whose Open button led to the detail
    this.headingCount = 0; // for the ids that label the recordings
  }

  /** Wire the filter form and the buttons (once, at start). */
  install() {
    const reasons = byId("audit-end-reason");
    for (const [reason, words] of Object.entries(AUDIT_END_WORDING)) {
      const option = element("option", `${words} (${reason})`);
      option.value = reason;
      reasons.append(option);
    }
    byId("audit-filter").addEventListener("submit", (event) => {
      event.preventDefault();
      this.load();
    });
    byId("audit-reset").addEventListener("click", () => {
      for (const [id] of FILTERS) {
        const field = byId(id);
        field.value = field.tagName === "SELECT" ? field.options[0].value : "";
      }
      this.load();
    });
    byId("audit-back").addEventListener("click", () => this.backToList());
  }

  // The list -------------------------------------------------------------------------

  async showList(role) {
    this.role = role;
    this.leaveSession();
    this.showView("audit-view", "audit-title");
    await this.load();
  }

  query() {
    const params = new URLSearchParams();
    for (const [id, name] of FILTERS) {
      let value = byId(id).value.trim();
      if (name === "since" || name === "until") value = utcIso(value);
      if (value !== "") params.set(name, value);
    }
    const text = params.toString();
    return text === "" ? "" : `?${text}`;
  }

  async load() {
    const generation = ++this.generation;
    const button = byId("audit-apply");
    button.disabled = true;
    setText("audit-error", "");
    setText("audit-summary", "Loading the sessions...");
    const answer = await this.api("GET", `${SESSIONS_PATH}${this.query()}`);
    button.disabled = false;
    if (generation !== this.generation) return;
    if (answer.status === 200 && answer.data !== null && Array.isArray(answer.data.sessions)) {
      this.sessions = answer.data.sessions;
      this.renderList();
      return;
    }
    this.sessions = [];
    this.renderList();
    if (answer.status === 401) {
      this.loginEnded();
      return;
    }
    const error = answer.data !== null && typeof answer.data.error === "string" ? answer.data.error : "";
    const messages = {
      0: "The relay does not answer. Try again.",
      400: `The filter was refused${error ? `: ${error}` : ""}.`,
      403: `Your role (${this.role}) cannot read the audit log.`,
    };
    setText("audit-summary", "");
    setText("audit-error", messages[answer.status] ?? `The sessions could not be loaded (${answer.status}).`);
  }

  renderList() {
    const rows = this.sessions.map((session) => this.sessionRow(session));
    byId("audit-rows").replaceChildren(...rows);
    show("audit-sessions", rows.length > 0);
    const count = this.sessions.length;
    const filtered = FILTERS.some(([id, name]) => name !== "limit" && byId(id).value.trim() !== "");
    let summary = `${count} session${count === 1 ? "" : "s"}, newest first.`;
    if (count === 0) summary = filtered ? "No session matches these filters." : "The audit log has no session yet.";
    setText("audit-summary", summary);
  }

  sessionRow(session) {
    const row = document.createElement("tr");
    const requested = utcText(session.requested_at);
    row.append(cell(requested, "nowrap"));
    row.append(cell(session.device_id, "device-id"));
    row.append(cell(session.engineer));
    row.append(cell(session.reason, "reason"));
    row.append(cell(list(session.channels).join(", ")));
    row.append(cell(durationText(session), "nowrap"));
    row.append(cell(endText(session)));
    const kinds = list(session.recordings).map((recording) => recording.kind);
    row.append(cell(kinds.length > 0 ? kinds.join(", ") : "none"));
    const open = element("button", "Open");
    open.type = "button";
    open.dataset.sessionId = session.session_id;
    open.setAttribute(
      "aria-label",
      `Open the session on ${session.device_id} by ${session.engineer}, requested ${requested}`,
    );
    open.addEventListener("click", () => this.openSession(session.session_id));
    const actions = cell(null);
    actions.append(open);
    row.append(actions);
    return row;
  }

  // One session --------------------------------------------------------------------------

  async openSession(sessionId) {
    const generation = ++this.generation;
    this.openedFrom = sessionId;
    this.say("Loading the session...");
    const answer = await this.api("GET", sessionPath(sessionId));
    if (generation !== this.generation) return;
    if (answer.status === 401) {
      this.loginEnded();
      return;
    }
    if (answer.status !== 200 || answer.data === null) {
      const messages = {
        0: "The relay does not answer. Try again.",
        403: `Your role (${this.role}) cannot read the audit log.`,
        404: "That session is not in the audit log.",
      };
      this.say(messages[answer.status] ?? `The session could not be loaded (${answer.status}).`);
      return;
    }
    this.leaveSession();
    this.generation = generation; // leaveSession moved it on; this answer is current
    const session = answer.data;
    setText("audit-session-device", session.device_id);
    this.renderFacts(session);
    this.renderTimeline(list(session.timeline));
    this.renderReceipts(session.receipts ?? {});
    const recordings = list(session.recordings);
    const shells = recordings.filter((recording) => recording.kind === "shell");
    const forwards = recordings.filter((recording) => recording.kind === "forwards");
    show("audit-playback-none", shells.length === 0);
    show("audit-forwards-none", forwards.length === 0);
    this.showView("audit-session-view", "audit-session-title");
    this.say(`Session on ${session.device_id} by ${session.engineer}.`);
    this.renderShells(session.session_id, shells, generation);
    this.renderForwards(session.session_id, forwards, generation);
  }

  renderFacts(session) {
    const facts = [
      ["Session id", session.session_id],
      ["Instrument", session.device_id],
      ["Engineer", session.engineer],
      ["Reason", session.reason],
      ["Access to", list(session.channels).join(", ")],
      ["Requested", utcText(session.requested_at)],
      [
        "Granted",
        session.granted_at
          ? `${utcText(session.granted_at)}${session.decided_by ? ` by ${session.decided_by}` : ""}`
          : "not granted",
      ],
      ["Ended", session.ended_at ? utcText(session.ended_at) : "still live"],
      ["How it ended", session.end_reason ? `${endText(session)} (${session.end_reason})` : endText(session)],
      ["Duration", durationText(session)],
      ["To the instrument", bytesText(session.bytes_to_device)],
      ["From the instrument", bytesText(session.bytes_from_device)],
    ];
    const rows = facts.map(([term, value]) => {
      const pair = document.createElement("div");
      pair.append(element("dt", term), element("dd", value));
      return pair;
    });
    byId("audit-facts").replaceChildren(...rows);
  }

  renderTimeline(records) {
    const rows = records.map((record) => {
      const row = document.createElement("tr");
      row.append(cell(record.seq, "nowrap"));
      row.append(cell(typeof record.ts === "string" ? record.ts.replace("T", " ") : "", "nowrap"));
      row.append(cell(record.event, "nowrap"));
      const fields = element("ul", null, "fields");
      for (const [key, value] of Object.entries(record)) {
        if (key === "seq" || key === "ts" || key === "event") continue;
        const item = element("li");
        item.append(element("span", key, "field-name"), ` ${fieldText(value)}`);
        fields.append(item);
      }
      const details = cell(null);
      details.append(fields);
      row.append(details);
      return row;
    });
    byId("audit-timeline").replaceChildren(...rows);
  }

  renderReceipts(receipts) {
    for (const kind of ["grant", "end"]) {
      const receipt = receipts[kind];
      const text = receipt === null || receipt === undefined ? "No receipt." : JSON.stringify(receipt, null, 2);
      setText(`audit-receipt-${kind}`, text);
    }
  }

  async renderShells(sessionId, recordings, generation) {
    const container = byId("audit-playback");
    const boxes = recordings.map((recording) => {
      const article = element("article", null, "recording");
      const title = element("h3", recording.name);
      title.id = `audit-recording-${++this.headingCount}`;
      article.setAttribute("aria-labelledby", title.id);
      const box = element("div", null, "player-box");
      const status = element("p", null, "help");
      status.setAttribute("role", "status");
      const links = element("p", null, "help");
      links.append(downloadLink(sessionId, recording));
      article.append(title, box, status, recordingFacts(recording), links);
      return { recording, box, status, article };
    });
    container.replaceChildren(...boxes.map((entry) => entry.article));
    if (boxes.length === 0) return;
    let create;
    try {
      create = await this.player();
    } catch {
      for (const entry of boxes) entry.status.textContent = "The player could not be loaded; download the recording instead.";
      return;
    }
    if (generation !== this.generation) return;
    for (const entry of boxes) {
      entry.status.textContent = "Press Play to watch the session.";
      const player = create(
        {
          url: recordingUrl(sessionId, entry.recording.name),
          fetchOpts: { credentials: "same-origin", cache: "no-store" },
        },
        entry.box,
        {
          controls: true,
          fit: "width",
          idleTimeLimit: IDLE_TIME_LIMIT_S,
          preload: true,
          terminalFontFamily: 'ui-monospace, "DejaVu Sans Mono", "Liberation Mono", monospace',
        },
      );
      player.addEventListener("play", () => {
        entry.status.textContent = "Playing.";
      });
      player.addEventListener("ended", () => {
        entry.status.textContent = "Played to the end.";
      });
      player.addEventListener("error", () => {
        entry.status.textContent = "The recording could not be played; download it instead.";
      });
      this.players.push(player);
    }
  }

  async player() {
    if (this.playerModule === null) this.playerModule = import(PLAYER_MODULE);
    try {
      return (await this.playerModule).create;
    } catch (error) {
      this.playerModule = null; // try again next time
      throw error;
    }
  }

  async renderForwards(sessionId, recordings, generation) {
    const container = byId("audit-forwards");
    const parts = recordings.map((recording) => {
      const article = element("article", null, "recording");
      const title = element("h3", recording.name);
      const status = element("p", "Loading...", "help");
      const links = element("p", null, "help");
      links.append(downloadLink(sessionId, recording));
      article.append(title, status, recordingFacts(recording), links);
      return { recording, article, status };
    });
    container.replaceChildren(...parts.map((part) => part.article));
    for (const part of parts) {
      const answer = await this.api("GET", recordingUrl(sessionId, part.recording.name));
      if (generation !== this.generation) return;
      if (answer.status !== 200 || !Array.isArray(answer.data)) {
        part.status.textContent = `The forwards could not be loaded (${answer.status}); download the file instead.`;
        continue;
      }
      part.status.replaceWith(this.forwardsTable(answer.data, part.recording.name));
    }
  }

  forwardsTable(streams, name) {
    const scroll = element("div", null, "table-scroll");
    const table = element("table", null, "table");
    const caption = element("caption", `Port forwards of ${name}`, "visually-hidden");
    const head = element("thead");
    const headings = element("tr");
    const columns = [
      "Stream",
      "Channel",
      "Port",
      "Opened (s)",
      "Closed (s)",
      "Outcome",
      "To the instrument",
      "From the instrument",
      "SHA-256 to / from",
    ];
    for (const text of columns) {
      const th = element("th", text);
      th.scope = "col";
      headings.append(th);
    }
    head.append(headings);
    const body = element("tbody");
    for (const stream of streams) {
      // forwards.json keeps each direction as {bytes, sha256} (relay/audit/recording.py).
      const to = direction(stream.to_device);
      const from = direction(stream.from_device);
      const row = element("tr");
      row.append(cell(stream.stream_id, "nowrap"));
      row.append(cell(stream.channel, "nowrap"));
      row.append(cell(stream.port, "nowrap"));
      row.append(cell(Number.isFinite(stream.opened_s) ? stream.opened_s.toFixed(1) : "", "nowrap"));
      row.append(cell(Number.isFinite(stream.closed_s) ? stream.closed_s.toFixed(1) : "", "nowrap"));
      row.append(cell(stream.outcome));
      row.append(cell(bytesText(to.bytes), "nowrap"));
      row.append(cell(bytesText(from.bytes), "nowrap"));
      const digests = cell(null);
      digests.append(element("code", to.sha256, "digest"), element("br"), element("code", from.sha256, "digest"));
      row.append(digests);
      body.append(row);
    }
    if (streams.length === 0) {
      const row = element("tr");
      const empty = cell("No port was forwarded.");
      empty.colSpan = columns.length;
      row.append(empty);
      body.append(row);
    }
    table.append(caption, head, body);
    scroll.append(table);
    return scroll;
  }

  // Leaving -----------------------------------------------------------------------------

  backToList() {
    const from = this.openedFrom;
    this.leaveSession();
    this.say("");
    this.showView("audit-view", "audit-title");
    const button = from && byId("audit-rows").querySelector(`button[data-session-id="${CSS.escape(from)}"]`);
    if (button) button.focus();
  }

  /** Stop and drop the players and the detail's contents. */
  leaveSession() {
    this.generation += 1;
    for (const player of this.players) {
      try {
        player.dispose();
      } catch {
        // Already gone with its element: nothing left to free.
      }
    }
    this.players = [];
    byId("audit-playback").replaceChildren();
    byId("audit-forwards").replaceChildren();
  }

  /** Logged out or the login ended: forget everything shown. */
  reset() {
    this.leaveSession();
    this.sessions = [];
    this.role = null;
    this.openedFrom = null;
    byId("audit-rows").replaceChildren();
    byId("audit-timeline").replaceChildren();
    byId("audit-facts").replaceChildren();
    setText("audit-receipt-grant", "");
    setText("audit-receipt-end", "");
    setText("audit-summary", "");
    setText("audit-error", "");
  }
}
