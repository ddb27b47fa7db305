// The engineers' console: login, the instrument list, session requests, and the
// terminal of a remote session; an instrument's monitoring page for every role
// (monitoring.js; customers see only their organisation's instruments and get
// no session controls); for auditors and admins the audit pages (audit.js).
//
// Security rules this file keeps:
// - The login token is never stored or read: the browser holds it in the
//   HttpOnly session cookie. The CSRF token (login answer, GET /api/v1/me) lives
//   in a variable only, and goes in the X-Relay-CSRF header of every POST and
//   DELETE.
// - WebSockets are opened on this page's own host; the cookie authenticates them
//   and the broker checks their Origin. No token ever goes into a URL.
// - Text from the network is set with textContent only.

import { Terminal } from "./vendor/xterm/xterm.mjs";
import { FitAddon } from "./vendor/addon-fit/addon-fit.mjs";
import { END_WORDING } from "./end-wording.js";
import { Countdown, byId, endWords, setText, show, warningText } from "./common.js";
import { AUDIT_ROLES, AuditPages } from "./audit.js";
import { MonitoringPage } from "./monitoring.js";
import {
  FrameType,
  INITIAL_WINDOW_BYTES,
  MAX_DATA_BYTES,
  MAX_TERMINAL_SIZE,
  TunnelError,
  decode,
  encode,
} from "./tunnel.js";

const CSRF_HEADER = "X-Relay-CSRF";
const SHELL_STREAM = 1;
/** Give the device credit back once this much output has reached the terminal. */
const WINDOW_STEP = INITIAL_WINDOW_BYTES / 2;
/** Most typed or pasted bytes kept while the device grants no credit. */
const MAX_PENDING_INPUT = 1024 * 1024;
/** How long to wait for the broker's end reason after the shell closed. */
const SHELL_CLOSED_GRACE_MS = 1500;
const SESSION_CLOSED = 4005;
const LOGIN_ENDED = 4004;
/** Roles that may open remote sessions (POST /api/v1/sessions). Every role
 * lists the instruments it may see. */
const SESSION_ROLES = new Set(["engineer", "admin"]);

const utf8 = new TextEncoder();

const app = {
  csrf: null, // in memory only
  username: null,
  role: null,
  events: null, // the device feed socket
  eventsRetryMs: 1000,
  eventsTimer: null,
  devices: [],
  requestDevice: null,
  session: null,
};

// Talking to the API ------------------------------------------------------------

async function api(method, path, body) {
  const headers = {};
  if (body !== undefined) headers["Content-Type"] = "application/json";
  if (method !== "GET" && app.csrf !== null) headers[CSRF_HEADER] = app.csrf;
  let response;
  try {
    response = await fetch(path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      credentials: "same-origin",
      cache: "no-store",
    });
  } catch {
    return { status: 0, data: null, retryAfter: null };
  }
  let data = null;
  try {
    data = await response.json();
  } catch {
    data = null;
  }
  return { status: response.status, data, retryAfter: response.headers.get("Retry-After") };
}

function errorText(answer) {
  return answer.data !== null && typeof answer.data.error === "string" ? answer.data.error : "";
}

function seconds(retryAfter) {
  const value = Number.parseInt(retryAfter ?? "", 10);
  return Number.isFinite(value) && value > 0 ? value : null;
}

function socketUrl(path) {
  return `wss://${location.host}${path}`;
}

function say(text) {
  setText("status", text);
}

// Views ---------------------------------------------------------------------------

const VIEWS = ["login-view", "devices-view", "monitor-view", "session-view", "audit-view", "audit-session-view"];
/** The header's section buttons, and the views that belong to each. */
const NAV = [
  ["nav-devices", ["devices-view", "monitor-view"]],
  ["nav-audit", ["audit-view", "audit-session-view"]],
];

function showView(id, focusId) {
  for (const view of VIEWS) show(view, view === id);
  const loggedIn = id !== "login-view";
  show("who", loggedIn);
  show("logout", loggedIn);
  // The sections are offered to those who may use both or the audit pages, and
  // never over a remote session's view (leaving it would end the terminal).
  const audits = AUDIT_ROLES.has(app.role);
  show("nav", loggedIn && audits && id !== "session-view");
  show("nav-devices", true);
  show("nav-audit", audits);
  for (const [button, views] of NAV) {
    if (views.includes(id)) byId(button).setAttribute("aria-current", "page");
    else byId(button).removeAttribute("aria-current");
  }
  if (focusId) byId(focusId).focus();
}

// Login ---------------------------------------------------------------------------

function showLogin(message = "") {
  stopEvents();
  audit.reset();
  monitoring.leave();
  app.csrf = null;
  app.username = null;
  app.role = null;
  app.devices = [];
  setText("login-error", message);
  byId("password").value = "";
  byId("totp").value = "";
  showView("login-view", byId("username").value ? "password" : "username");
}

async function login(event) {
  event.preventDefault();
  const form = byId("login-form");
  if (!form.reportValidity()) return;
  const button = byId("login-submit");
  button.disabled = true;
  setText("login-error", "");
  say("Logging in...");
  const answer = await api("POST", "/api/v1/login", {
    username: byId("username").value,
    password: byId("password").value,
    totp: byId("totp").value.trim(),
  });
  button.disabled = false;
  say("");
  byId("totp").value = ""; // a code works once
  if (answer.status === 200) {
    // answer.data.token is deliberately dropped: the cookie carries the login.
    app.csrf = answer.data.csrf_token;
    byId("password").value = "";
    await enter();
    return;
  }
  const wait = seconds(answer.retryAfter);
  const later = wait === null ? "a few seconds" : wait === 1 ? "1 second" : `${wait} seconds`;
  const messages = {
    0: "The relay does not answer. Check your connection and try again.",
    401: "Wrong username, password or code.",
    403: "The login was refused as a cross-site request. Open the console at its own address.",
    429: `Too many attempts. Wait ${later} before trying again.`,
    503: `The relay is unavailable. Try again in ${later}.`,
  };
  setText("login-error", messages[answer.status] ?? `The login failed (${answer.status}).`);
  byId(answer.status === 401 ? "password" : "totp").focus();
}

/**
 * Load who is logged in (cookie) and open the instrument list, or the audit
 * pages for a role that cannot open sessions; false if nobody.
 */
async function enter() {
  const me = await api("GET", "/api/v1/me");
  if (me.status !== 200) return false;
  app.csrf = me.data.csrf_token;
  app.username = me.data.username;
  app.role = me.data.role;
  say("");
  setText("who-name", `${app.username} (${app.role})`);
  // Every role gets the live instrument list (only the instruments it may
  // see); auditors start on the audit pages.
  startEvents();
  if (!SESSION_ROLES.has(app.role) && AUDIT_ROLES.has(app.role)) {
    await audit.showList(app.role);
    await loadDevices();
    return true;
  }
  showDevices();
  await loadDevices();
  return true;
}

async function logout() {
  monitoring.leave();
  if (app.session !== null) app.session.dispose();
  app.session = null;
  stopEvents();
  const answer = await api("POST", "/api/v1/logout");
  showLogin(answer.status === 200 || answer.status === 401 ? "" : "The relay did not confirm the logout.");
  say("Logged out.");
}

/** The login is gone (expired, logged out elsewhere, disabled). */
function loginEnded() {
  if (app.session !== null) app.session.dispose();
  app.session = null;
  showLogin("Your login has ended. Log in again.");
}

// Instruments -----------------------------------------------------------------------

function showDevices() {
  monitoring.leave();
  showView("devices-view", "devices-title");
  renderDevices();
}

async function loadDevices() {
  const answer = await api("GET", "/api/v1/devices");
  if (answer.status === 200) {
    app.devices = answer.data;
    renderDevices();
  } else if (answer.status === 401) {
    loginEnded();
  } else {
    setText("devices-summary", "The instrument list could not be loaded.");
  }
}

function renderDevices() {
  const list = byId("devices");
  const filter = byId("filter").value.trim().toLowerCase();
  // An instrument is found by its id or by a label (customer, site, model ...).
  const matches = (d) =>
    d.device_id.toLowerCase().includes(filter) ||
    Object.entries(d.labels || {}).some(([k, v]) => `${k}=${v}`.toLowerCase().includes(filter));
  const shown = app.devices.filter(matches);
  const focused = document.activeElement?.dataset?.deviceId ?? null;
  const items = shown.map((device) => deviceItem(device));
  list.replaceChildren(...items);
  if (focused !== null) {
    const again = list.querySelector(`button[data-device-id="${CSS.escape(focused)}"]`);
    if (again !== null && !again.disabled) again.focus();
  }
  const online = app.devices.filter((d) => d.online).length;
  const count = app.devices.length;
  let summary = `${count} instrument${count === 1 ? "" : "s"}, ${online} online.`;
  if (app.devices.length === 0) summary = "No instrument is enrolled yet.";
  else if (shown.length === 0) summary = `No instrument id or label contains "${filter}".`;
  else if (shown.length < app.devices.length) summary += ` ${shown.length} shown.`;
  setText("devices-summary", summary);
}

function badge(text, kind) {
  const element = document.createElement("span");
  element.className = `badge ${kind}`;
  element.textContent = text;
  return element;
}

function deviceItem(device) {
  const item = document.createElement("li");
  const name = document.createElement("span");
  name.className = "device-id";
  name.textContent = device.device_id;
  item.append(name);
  const labels = Object.entries(device.labels || {}).sort(([a], [b]) => a.localeCompare(b));
  if (labels.length > 0) {
    const list = document.createElement("span");
    list.className = "device-labels";
    list.setAttribute("aria-label", "labels");
    for (const [key, value] of labels) list.append(badge(`${key}=${value}`, "label"));
    item.append(list);
  }
  item.append(device.online ? badge("online", "online") : badge("offline", "offline"));
  if (device.in_session) item.append(badge("in session", "busy"));
  if (device.revoked) item.append(badge("revoked", "revoked"));
  // Customers and auditors never hold sessions: no session button at all.
  if (SESSION_ROLES.has(app.role)) item.append(sessionButton(device));
  const monitor = document.createElement("button");
  monitor.type = "button";
  monitor.textContent = "Monitoring";
  monitor.dataset.monitorId = device.device_id;
  monitor.setAttribute("aria-label", `Alarms, statistics and history of ${device.device_id}`);
  monitor.addEventListener("click", () => openMonitoring(device.device_id));
  item.append(monitor);
  return item;
}

/** The "Request session" button of an instrument (first in its row, so the
 * keyboard reaches it first after the filter). */
function sessionButton(device) {
  const button = document.createElement("button");
  button.type = "button";
  button.textContent = "Request session";
  button.dataset.deviceId = device.device_id;
  button.setAttribute("aria-label", `Request a session on ${device.device_id}`);
  button.disabled = !device.online || device.revoked || device.in_session;
  button.addEventListener("click", () => openRequest(device.device_id));
  return button;
}

function startEvents() {
  stopEvents();
  const socket = new WebSocket(socketUrl("/api/v1/events"));
  app.events = socket;
  socket.addEventListener("open", () => {
    app.eventsRetryMs = 1000;
  });
  socket.addEventListener("message", (event) => {
    let message;
    try {
      message = JSON.parse(event.data);
    } catch {
      return;
    }
    if (message.type === "devices" && Array.isArray(message.devices)) {
      app.devices = message.devices;
      renderDevices();
    }
  });
  socket.addEventListener("close", (event) => {
    if (app.events !== socket) return; // replaced or stopped on purpose
    app.events = null;
    if (event.code === LOGIN_ENDED) {
      loginEnded();
      return;
    }
    // Lost: the list stays, and comes back live after a short wait.
    app.eventsTimer = setTimeout(startEvents, app.eventsRetryMs);
    app.eventsRetryMs = Math.min(app.eventsRetryMs * 2, 30000);
  });
}

function stopEvents() {
  if (app.eventsTimer !== null) clearTimeout(app.eventsTimer);
  app.eventsTimer = null;
  const socket = app.events;
  app.events = null;
  if (socket !== null) socket.close(1000);
}

// An instrument's monitoring page (monitoring.js) -------------------------------------

const monitoring = new MonitoringPage({
  api,
  say,
  showView,
  loginEnded: () => loginEnded(),
  back: () => openDevicesSection(),
});

function openMonitoring(deviceId) {
  audit.leaveSession();
  if (app.session !== null) app.session.dispose();
  app.session = null;
  show("request-panel", false);
  monitoring.open(deviceId, app.role);
}

// Requesting a session ---------------------------------------------------------------

function openRequest(deviceId) {
  app.requestDevice = deviceId;
  setText("request-device", deviceId);
  setText("request-error", "");
  show("request-panel", true);
  byId("reason").focus();
}

function closeRequest() {
  const deviceId = app.requestDevice;
  app.requestDevice = null;
  show("request-panel", false);
  const button = deviceId && byId("devices").querySelector(`button[data-device-id="${CSS.escape(deviceId)}"]`);
  (button && !button.disabled ? button : byId("filter")).focus();
}

async function requestSession(event) {
  event.preventDefault();
  const deviceId = app.requestDevice;
  const reason = byId("reason").value.trim();
  if (!reason) {
    setText("request-error", "Give a reason: the person at the instrument reads it.");
    byId("reason").focus();
    return;
  }
  if (!byId("channel-shell").checked) {
    setText("request-error", "The console opens a shell: choose Shell. For ports use relay forward.");
    byId("channel-shell").focus();
    return;
  }
  const button = byId("request-submit");
  button.disabled = true;
  const answer = await api("POST", "/api/v1/sessions", {
    device_id: deviceId,
    reason,
    channels: ["shell"],
  });
  button.disabled = false;
  if (answer.status === 201) {
    byId("reason").value = "";
    show("request-panel", false);
    app.requestDevice = null;
    app.session = new RemoteSession(answer.data.session_id, deviceId);
    app.session.begin();
    return;
  }
  if (answer.status === 401) {
    loginEnded();
    return;
  }
  const error = errorText(answer);
  const messages = {
    0: "The relay does not answer. Try again.",
    400: `The request was refused: ${error}.`,
    403: error.startsWith("channel not allowed")
      ? `The policy does not allow this access (${error}).`
      : "The request was refused: your role may not open sessions, or the page is not the console's own.",
    404: "The instrument is not connected.",
    409: "The instrument is busy: it already has a pending or active session.",
    503: "The relay is not taking sessions right now. Try again shortly.",
  };
  setText("request-error", messages[answer.status] ?? `The request failed (${answer.status}).`);
}

// A remote session ---------------------------------------------------------------------

/**
 * One remote session: its attach socket, the status the broker sends on it, and
 * the shell stream inside the tunnel, shown in an xterm terminal.
 *
 * Credit (relay/proto/tunnel.py): each direction of the stream may carry
 * INITIAL_WINDOW_BYTES after OPEN_OK, more as the other side grants WINDOWs.
 * Typed bytes wait while the device grants none; output is handed to xterm and
 * credit goes back once xterm has processed it, so the page never buffers more
 * than it granted.
 */
class RemoteSession {
  constructor(sessionId, deviceId) {
    this.sessionId = sessionId;
    this.deviceId = deviceId;
    this.socket = null;
    this.state = "requested";
    this.endReason = null;
    this.over = false;
    this.term = null;
    this.fit = null;
    this.resizeObserver = null;
    this.onWindowResize = null;
    // The shell stream.
    this.streamOpening = false;
    this.streamOpen = false;
    this.sentFinal = false;
    this.peerFinal = false;
    this.peerEof = false;
    this.sendCredit = 0;
    this.receiveCredit = 0;
    this.unacknowledged = 0;
    this.pending = [];
    this.pendingBytes = 0;
    this.shellClosedTimer = null;
    this.timeLeft = new Countdown("time-left");
    this.grantLeft = new Countdown("grant-countdown");
  }

  get path() {
    return `/api/v1/sessions/${encodeURIComponent(this.sessionId)}`;
  }

  begin() {
    setText("session-device", this.deviceId);
    show("waiting", true);
    show("ended", false);
    show("terminal", false);
    show("terminal-help", false);
    show("time-left-line", false);
    show("end", false);
    show("session-warning", false);
    showView("session-view", "session-title");
    say("Request sent.");
    this.attach();
    this.loadGrantDeadline();
  }

  async loadGrantDeadline() {
    const answer = await api("GET", this.path);
    if (answer.status !== 200 || this.over) return;
    const deadline = Date.parse(answer.data.grant_deadline);
    const waiting = this.state === "requested" || this.state === "offered";
    if (Number.isFinite(deadline) && waiting) this.grantLeft.start(deadline);
  }

  attach() {
    const socket = new WebSocket(socketUrl(`${this.path}/attach`));
    socket.binaryType = "arraybuffer";
    this.socket = socket;
    socket.addEventListener("message", (event) => {
      if (typeof event.data === "string") this.onStatus(event.data);
      else this.onFrame(event.data);
    });
    socket.addEventListener("close", (event) => this.onClosed(event.code, event.reason));
  }

  // The broker's status messages ---------------------------------------------------

  onStatus(text) {
    let message;
    try {
      message = JSON.parse(text);
    } catch {
      return;
    }
    if (message.type === "state") this.onState(message.state, message.ends_at_ms);
    else if (message.type === "warning") this.onWarning(message.seconds_left);
    else if (message.type === "end") this.finish(message.reason);
  }

  onState(state, endsAtMs) {
    if (this.over) return;
    this.state = state;
    if (Number.isFinite(endsAtMs)) {
      this.timeLeft.start(endsAtMs);
      show("time-left-line", true);
    }
    if (state === "offered") {
      say("The person at the instrument is being asked.");
    } else if (state === "granted") {
      this.grantLeft.stop();
      show("waiting", false);
      say("Access allowed. Connecting to the instrument...");
    } else if (state === "active") {
      this.grantLeft.stop();
      show("waiting", false);
      show("end", true);
      if (this.term === null) this.openTerminal();
    }
  }

  onWarning(secondsLeft) {
    if (this.over || !Number.isFinite(secondsLeft)) return;
    setText("session-warning", warningText(secondsLeft));
    show("session-warning", true);
  }

  // The terminal ---------------------------------------------------------------------

  openTerminal() {
    byId("terminal").classList.remove("over");
    const container = byId("terminal-screen");
    show("terminal", true);
    show("terminal-help", true);
    const term = new Terminal({
      cursorBlink: true,
      fontFamily: 'ui-monospace, "DejaVu Sans Mono", "Liberation Mono", monospace',
      fontSize: 15,
      scrollback: 5000,
      theme: { background: "#14181d", foreground: "#e8e8e8", cursor: "#ffcc66" },
    });
    const fit = new FitAddon();
    term.loadAddon(fit);
    term.open(container);
    this.term = term;
    this.fit = fit;
    term.attachCustomKeyEventHandler((event) => this.onKey(event));
    term.onData((text) => this.sendInput(utf8.encode(text)));
    term.onBinary((text) => this.sendInput(Uint8Array.from(text, (c) => c.charCodeAt(0) & 0xff)));
    term.onResize(({ cols, rows }) => this.sendResize(cols, rows));
    this.fitNow();
    this.onWindowResize = () => requestAnimationFrame(() => this.fitNow());
    window.addEventListener("resize", this.onWindowResize);
    this.resizeObserver = new ResizeObserver(this.onWindowResize);
    this.resizeObserver.observe(container);
    term.focus();
    this.openShell();
    say("Connected. Opening the shell...");
  }

  fitNow() {
    if (this.term === null || this.over || byId("terminal").hidden) return;
    try {
      this.fit.fit();
    } catch {
      // Not measurable yet (hidden, or no font metrics): the next resize fits.
    }
  }

  onKey(event) {
    // Keys the page keeps for itself, so that they never reach the shell. The
    // browser's own copy and paste (context menu, Shift+Insert) are left alone.
    if (!(event.ctrlKey && event.shiftKey) || event.altKey || event.metaKey) return true;
    const key = event.key.toLowerCase();
    if (key === "c") {
      if (event.type === "keydown") {
        const selected = this.term.getSelection();
        if (selected && navigator.clipboard) {
          navigator.clipboard.writeText(selected).catch(() => say("The browser did not allow copying."));
        }
        event.preventDefault();
      }
      return false;
    }
    if (key === "v") return false; // the browser pastes; xterm sends what is pasted
    if (key === "e") {
      if (event.type === "keydown") {
        event.preventDefault();
        byId("end").focus();
      }
      return false;
    }
    return true;
  }

  // The shell stream -------------------------------------------------------------------

  send(frame) {
    if (this.socket !== null && this.socket.readyState === WebSocket.OPEN) {
      this.socket.send(encode(frame));
    }
  }

  openShell() {
    const size = (value) => Math.min(MAX_TERMINAL_SIZE, Math.max(1, value));
    this.streamOpening = true;
    this.send({
      type: FrameType.OPEN,
      streamId: SHELL_STREAM,
      channel: "shell",
      cols: size(this.term.cols),
      rows: size(this.term.rows),
    });
  }

  sendInput(bytes) {
    if (this.over || this.sentFinal || this.peerFinal || bytes.length === 0) return;
    if (this.pendingBytes + bytes.length > MAX_PENDING_INPUT) {
      say("The instrument is not taking input right now; that input was dropped.");
      return;
    }
    this.pending.push(bytes);
    this.pendingBytes += bytes.length;
    this.flush();
  }

  flush() {
    while (this.streamOpen && this.pending.length > 0 && this.sendCredit > 0) {
      const head = this.pending[0];
      const size = Math.min(head.length, this.sendCredit, MAX_DATA_BYTES);
      const payload = head.subarray(0, size);
      if (size === head.length) this.pending.shift();
      else this.pending[0] = head.subarray(size);
      this.pendingBytes -= size;
      this.sendCredit -= size;
      this.send({ type: FrameType.DATA, streamId: SHELL_STREAM, payload });
    }
  }

  sendResize(cols, rows) {
    if (!this.streamOpen || this.sentFinal || this.peerFinal) return;
    const size = (value) => Math.min(MAX_TERMINAL_SIZE, Math.max(1, value));
    this.send({ type: FrameType.RESIZE, streamId: SHELL_STREAM, cols: size(cols), rows: size(rows) });
  }

  onFrame(data) {
    if (this.over) return;
    let frame;
    try {
      frame = decode(data);
      if (frame.streamId !== SHELL_STREAM || !this.streamOpening) {
        throw new TunnelError(`a frame for stream ${frame.streamId}, which this console never opened`);
      }
      this.onShellFrame(frame);
    } catch (error) {
      if (!(error instanceof TunnelError)) throw error;
      this.protocolError(error.message);
    }
  }

  onShellFrame(frame) {
    switch (frame.type) {
      case FrameType.OPEN_OK:
        if (this.streamOpen) throw new TunnelError("a second OPEN_OK");
        this.streamOpen = true;
        this.sendCredit = INITIAL_WINDOW_BYTES;
        this.receiveCredit = INITIAL_WINDOW_BYTES;
        say("Connected to the instrument's shell.");
        this.sendResize(this.term.cols, this.term.rows); // in case the window changed meanwhile
        this.flush();
        break;
      case FrameType.OPEN_FAIL:
        if (this.streamOpen) throw new TunnelError("OPEN_FAIL on an open stream");
        this.closeShell(`The instrument could not open a shell${frame.reason ? `: ${frame.reason}` : "."}`);
        break;
      case FrameType.DATA:
        if (!this.streamOpen || this.peerEof) throw new TunnelError("DATA outside an open stream");
        if (frame.payload.length > this.receiveCredit) throw new TunnelError("DATA beyond the credit granted");
        this.receiveCredit -= frame.payload.length;
        if (!this.sentFinal) {
          const size = frame.payload.length;
          this.term.write(frame.payload, () => this.consumed(size));
        }
        break;
      case FrameType.WINDOW:
        if (!this.streamOpen) throw new TunnelError("WINDOW before OPEN_OK");
        this.sendCredit += frame.credit;
        this.flush();
        break;
      case FrameType.EOF:
        if (!this.streamOpen) throw new TunnelError("EOF before OPEN_OK");
        this.peerEof = true;
        break;
      case FrameType.CLOSE:
        this.closeShell("The shell on the instrument has closed.");
        break;
      default:
        throw new TunnelError(`the device may not send frame type ${frame.type}`);
    }
  }

  consumed(size) {
    if (this.over || this.sentFinal || this.peerFinal || this.peerEof) return;
    this.unacknowledged += size;
    if (this.unacknowledged >= WINDOW_STEP) {
      const credit = this.unacknowledged;
      this.unacknowledged = 0;
      this.receiveCredit += credit;
      this.send({ type: FrameType.WINDOW, streamId: SHELL_STREAM, credit });
    }
  }

  /** The device sent its final frame: answer with ours, then end. */
  closeShell(message) {
    this.peerFinal = true;
    if (!this.sentFinal) {
      this.sentFinal = true;
      this.send({ type: FrameType.CLOSE, streamId: SHELL_STREAM, code: 0 });
    }
    this.endAfterShell(message);
  }

  /**
   * The shell is gone: for the console the session is over. The broker's end
   * (with its reason) usually follows at once, e.g. when the person at the
   * instrument ended it; otherwise the shell exited on its own and the console
   * ends the session itself.
   */
  endAfterShell(message) {
    say(message);
    if (this.shellClosedTimer !== null || this.over) return;
    this.shellClosedTimer = setTimeout(() => {
      if (!this.over) this.end();
    }, SHELL_CLOSED_GRACE_MS);
  }

  protocolError(detail) {
    say(`The tunnel sent something this console does not accept (${detail}); ending the session.`);
    this.end();
  }

  // Ending -------------------------------------------------------------------------------

  /** End (or, before the grant, withdraw) the session: DELETE; the broker closes the socket. */
  async end() {
    if (this.over) return;
    byId("end").disabled = true;
    byId("cancel").disabled = true;
    const answer = await api("DELETE", this.path);
    byId("end").disabled = false;
    byId("cancel").disabled = false;
    if (answer.status === 200) {
      // The socket's close carries the reason; the view has it already.
      if (answer.data.end_reason) this.finish(answer.data.end_reason);
    } else if (answer.status === 401) {
      loginEnded();
    } else if (answer.status === 404 || answer.status === 409) {
      await this.learnEnd();
    } else {
      say("The relay did not end the session; try again.");
    }
  }

  onClosed(code, reason) {
    this.socket = null;
    if (this.over) return;
    if (code === SESSION_CLOSED && reason) {
      this.finish(reason);
    } else if (code === LOGIN_ENDED) {
      loginEnded();
    } else {
      // Refused at the upgrade, or the connection dropped: ask the API.
      this.learnEnd();
    }
  }

  async learnEnd() {
    if (this.over) return;
    const answer = await api("GET", this.path);
    if (this.over) return;
    if (answer.status === 401) {
      loginEnded();
      return;
    }
    if (answer.status === 200 && answer.data.end_reason) {
      this.finish(answer.data.end_reason);
      return;
    }
    // Still live on the broker, but this page lost its connection to it: a
    // terminal without its socket is no use, so end the session.
    if (answer.status === 200) {
      await api("DELETE", this.path);
    }
    this.finish("engineer_disconnect");
  }

  finish(reason) {
    if (this.over) return;
    this.over = true;
    this.endReason = reason;
    this.stop();
    const words = endWords(END_WORDING, reason);
    setText("end-reason", words.charAt(0).toUpperCase() + words.slice(1) + ".");
    setText("end-detail", this.term !== null ? "The terminal below shows the session's last output." : "");
    show("waiting", false);
    show("end", false);
    show("time-left-line", false);
    show("session-warning", false);
    show("ended", true);
    say(`Session ended: ${words}.`);
    byId("ended-title").focus();
  }

  /** Stop the clocks, the socket and the terminal's input; the output stays readable. */
  stop() {
    this.timeLeft.stop();
    this.grantLeft.stop();
    if (this.shellClosedTimer !== null) clearTimeout(this.shellClosedTimer);
    this.shellClosedTimer = null;
    const socket = this.socket;
    this.socket = null;
    if (socket !== null) socket.close(1000);
    if (this.onWindowResize !== null) window.removeEventListener("resize", this.onWindowResize);
    if (this.resizeObserver !== null) this.resizeObserver.disconnect();
    this.onWindowResize = null;
    this.resizeObserver = null;
    if (this.term !== null) {
      this.term.options.disableStdin = true;
      this.term.options.cursorBlink = false;
      byId("terminal").classList.add("over");
    }
  }

  /** Leave the session's view for good (logout, back to the list). */
  dispose() {
    this.over = true;
    this.stop();
    if (this.term !== null) this.term.dispose();
    this.term = null;
    byId("terminal-screen").replaceChildren();
  }
}

function backToDevices() {
  if (app.session !== null) app.session.dispose();
  app.session = null;
  say("");
  showDevices();
}

// The audit pages (audit.js) ------------------------------------------------------------

const audit = new AuditPages({ api, say, showView, loginEnded: () => loginEnded() });

function openDevicesSection() {
  audit.leaveSession();
  say("");
  showDevices();
}

function openAuditSection() {
  monitoring.leave();
  if (app.session !== null) app.session.dispose();
  app.session = null;
  say("");
  audit.showList(app.role);
}

// Start ------------------------------------------------------------------------------------

async function start() {
  byId("login-form").addEventListener("submit", login);
  byId("logout").addEventListener("click", logout);
  byId("filter").addEventListener("input", renderDevices);
  byId("request-form").addEventListener("submit", requestSession);
  byId("request-cancel").addEventListener("click", closeRequest);
  byId("cancel").addEventListener("click", () => app.session?.end());
  byId("end").addEventListener("click", () => app.session?.end());
  byId("back").addEventListener("click", backToDevices);
  byId("nav-devices").addEventListener("click", openDevicesSection);
  byId("nav-audit").addEventListener("click", openAuditSection);
  audit.install();
  monitoring.install();
  say("Loading...");
  const resumed = await enter();
  if (!resumed) {
    say("");
    showLogin();
  }
}

start();
