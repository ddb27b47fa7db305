// An instrument's monitoring page in the console: its alarms, charts of its
// daily statistics (uPlot), its last configuration and consumables with a
// "Request now" button per kind, export links, and its remote-session history.
//
// Every role opens it for the instruments it may see (the broker answers 404
// for any other, docs/monitoring.md "Who sees what"). Customers and auditors
// get no session controls here; auditors only read, so they get no "Request
// now" either (the broker refuses them anyway).
//
// Rules this file keeps (as console.js): text from the network is set with
// textContent only, never as HTML; the page's requests carry the session
// cookie, and its one POST the CSRF header (console.js's api()); no inline
// script or style in the markup (the console's CSP).

import uPlot from "./vendor/uplot/uPlot.esm.js";
import { END_WORDING } from "./end-wording.js";
import { byId, endWords, setText, show } from "./common.js";

/** Roles that may ask an instrument for its configuration or consumables. */
export const REQUEST_ROLES = new Set(["engineer", "admin", "customer"]);
/** How often a pending data request is polled, and for how long at most. */
const POLL_MS = 2000;
const POLL_LIMIT_MS = 5 * 60 * 1000;
/** The chart ranges offered, in days. */
const RANGES = [30, 90, 365];
const KINDS = [
  ["configuration", "Configuration"],
  ["consumables", "Consumables"],
];
const STATUS_WORDS = {
  pending: "waiting for the instrument",
  answered: "answered",
  refused: "refused by the instrument",
  lapsed: "not answered in time",
};
/** Line colours of the charts, one per measurement in turn. */
const COLOURS = ["#0b4f6c", "#0b6e4f", "#8a4baf", "#b35c00", "#2f6fba", "#a3303d", "#4a5561"];

function element(tag, text = null, className = null) {
  const node = document.createElement(tag);
  if (text !== null) node.textContent = text;
  if (className !== null) node.className = className;
  return node;
}

function when(iso) {
  if (typeof iso !== "string") return "";
  const time = new Date(iso);
  if (Number.isNaN(time.getTime())) return iso;
  return time.toISOString().replace("T", " ").replace(/\.\d+Z$/, "Z").replace(/:\d\dZ$/, "Z");
}

function devicePath(deviceId, rest) {
  return `/api/v1/devices/${encodeURIComponent(deviceId)}/${rest}`;
}

function daysAgoIso(days) {
  return new Date(Date.now() - days * 86400 * 1000).toISOString();
}

/**
 * The charts' data: one series per measurement name, in the order the
 * instrument reports them; x is the day (seconds since the epoch, midnight UTC).
 */
export function seriesOf(dailyStats) {
  const byName = new Map();
  for (const record of dailyStats) {
    const day = Date.parse(`${record.day}T00:00:00Z`) / 1000;
    if (!Number.isFinite(day) || !Array.isArray(record.values)) continue;
    for (const value of record.values) {
      if (!byName.has(value.name)) byName.set(value.name, { name: value.name, unit: value.unit, xs: [], ys: [] });
      const series = byName.get(value.name);
      series.xs.push(day);
      series.ys.push(Number(value.value));
    }
  }
  return [...byName.values()];
}

/** A measurement name for people: "volume_dispensed" -> "Volume dispensed". */
function label(name) {
  const words = name.replaceAll("_", " ");
  return words.charAt(0).toUpperCase() + words.slice(1);
}

/**
 * The monitoring page. console.js owns the views, the API helper and the status
 * line, and hands them in; this class owns the page's contents.
 */
export class MonitoringPage {
  constructor({ api, say, showView, loginEnded, back }) {
    this.api = api;
    this.say = say;
    this.showView = showView;
    this.loginEnded = loginEnded;
    this.back = back;
    this.deviceId = null;
    this.role = null;
    this.charts = [];
    this.polls = new Map(); // kind -> timer
    this.rangeDays = RANGES[0];
    // Answers that arrive after the user moved on are dropped.
    this.generation = 0;
  }

  /** Wire the page's fixed controls (once, at start). */
  install() {
    byId("monitor-back").addEventListener("click", () => this.back());
    const range = byId("monitor-range");
    for (const days of RANGES) {
      const option = element("option", `Last ${days} days`);
      option.value = String(days);
      range.append(option);
    }
    range.addEventListener("change", () => {
      this.rangeDays = Number.parseInt(range.value, 10) || RANGES[0];
      this.loadStats();
      this.renderExports();
    });
    for (const [kind] of KINDS) {
      byId(`monitor-request-${kind}`).addEventListener("click", () => this.requestNow(kind));
    }
    window.addEventListener("resize", () => this.resizeCharts());
  }

  /** Open the page of *deviceId* for a user of *role*. */
  async open(deviceId, role) {
    this.leave();
    this.deviceId = deviceId;
    this.role = role;
    const generation = ++this.generation;
    setText("monitor-device", deviceId);
    for (const [kind] of KINDS) {
      show(`monitor-request-${kind}`, REQUEST_ROLES.has(role));
      setText(`monitor-request-${kind}-status`, "");
    }
    this.renderExports();
    this.showView("monitor-view", "monitor-title");
    this.say("");
    await Promise.all([this.loadAlarms(generation), this.loadStats(), this.loadSnapshots(generation), this.loadSessions(generation)]);
  }

  /** Leave the page: stop polling, free the charts. */
  leave() {
    this.generation += 1;
    for (const timer of this.polls.values()) clearTimeout(timer);
    this.polls.clear();
    for (const chart of this.charts) chart.destroy();
    this.charts = [];
    byId("monitor-charts").replaceChildren();
    this.deviceId = null;
  }

  /** A failed answer: the login is gone, the instrument is gone, or trouble. */
  failed(answer, where) {
    if (answer.status === 401) {
      this.loginEnded();
      return;
    }
    const message =
      answer.status === 404
        ? "This instrument is not known, or not yours to see."
        : `The ${where} could not be loaded (${answer.status || "no answer"}).`;
    this.say(message);
  }

  // Alarms --------------------------------------------------------------------------

  async loadAlarms(generation) {
    const answer = await this.api("GET", devicePath(this.deviceId, "alarms?limit=100"));
    if (generation !== this.generation) return;
    if (answer.status !== 200) {
      this.failed(answer, "alarms");
      return;
    }
    const alarms = answer.data.alarms;
    const list = byId("monitor-alarms");
    list.replaceChildren(
      ...alarms.map((alarm) => {
        const item = element("li", null, `alarm severity-${alarm.severity} state-${alarm.state}`);
        item.append(element("span", alarm.severity, `badge severity sev-${alarm.severity}`));
        item.append(element("span", alarm.state === "cleared" ? "cleared" : "raised", "badge state"));
        item.append(element("time", when(alarm.device_time), "alarm-time"));
        item.append(element("code", alarm.code, "alarm-code"));
        item.append(element("span", alarm.text, "alarm-text"));
        return item;
      }),
    );
    setText(
      "monitor-alarms-summary",
      alarms.length === 0 ? "No alarm reported." : `The ${alarms.length} newest alarms, newest first.`,
    );
  }

  // Daily statistics ----------------------------------------------------------------

  async loadStats() {
    const generation = this.generation;
    const since = daysAgoIso(this.rangeDays + 1);
    const answer = await this.api(
      "GET",
      devicePath(this.deviceId, `daily-stats?since=${encodeURIComponent(since)}&limit=1000`),
    );
    if (generation !== this.generation) return;
    if (answer.status !== 200) {
      this.failed(answer, "daily statistics");
      return;
    }
    this.renderCharts(seriesOf(answer.data.daily_stats));
  }

  renderCharts(allSeries) {
    for (const chart of this.charts) chart.destroy();
    this.charts = [];
    const box = byId("monitor-charts");
    box.replaceChildren();
    setText(
      "monitor-charts-summary",
      allSeries.length === 0
        ? "No daily statistics in this range."
        : `${allSeries.length} measurements, one chart each.`,
    );
    allSeries.forEach((series, index) => {
      const figure = element("figure", null, "chart");
      figure.dataset.measurement = series.name;
      const caption = element("figcaption", series.unit ? `${label(series.name)} (${series.unit})` : label(series.name));
      figure.append(caption);
      const plot = element("div", null, "chart-plot");
      figure.append(plot);
      box.append(figure);
      const colour = COLOURS[index % COLOURS.length];
      const chart = new uPlot(
        {
          width: this.chartWidth(figure),
          height: 180,
          legend: { show: false },
          cursor: { drag: { x: false, y: false } },
          scales: { x: { time: true } },
          series: [
            {},
            { label: label(series.name), stroke: colour, width: 2, fill: `${colour}1a`, points: { size: 4 } },
          ],
          axes: [{}, { size: 56, label: series.unit || undefined, labelSize: 16 }],
          hooks: {
            // The browser test (and a curious reader) can see that it drew.
            draw: [(u) => (u.root.dataset.drawn = String(Number(u.root.dataset.drawn || 0) + 1))],
          },
        },
        [series.xs, series.ys],
        plot,
      );
      plot.setAttribute("role", "img");
      plot.setAttribute(
        "aria-label",
        `${label(series.name)}: ${series.ys.length} days, last value ${series.ys.at(-1)} ${series.unit}`,
      );
      this.charts.push(chart);
    });
  }

  chartWidth(figure) {
    const width = figure.clientWidth || byId("monitor-charts").clientWidth || 360;
    return Math.max(240, Math.min(width - 8, 720));
  }

  resizeCharts() {
    for (const chart of this.charts) {
      const figure = chart.root.closest("figure");
      if (figure !== null) chart.setSize({ width: this.chartWidth(figure), height: 180 });
    }
  }

  // Configuration and consumables --------------------------------------------------

  async loadSnapshots(generation = this.generation) {
    const answer = await this.api("GET", devicePath(this.deviceId, "snapshots"));
    if (generation !== this.generation) return;
    if (answer.status !== 200) {
      this.failed(answer, "configuration and consumables");
      return;
    }
    this.renderConfiguration(answer.data.configuration);
    this.renderConsumables(answer.data.consumables);
    this.renderRequests(answer.data.data_requests);
  }

  renderConfiguration(record) {
    const body = byId("monitor-configuration");
    setText("monitor-configuration-when", record === null ? "Never requested." : `As of ${when(record.device_time)} (instrument time).`);
    show("monitor-configuration-table", record !== null);
    if (record === null) {
      body.replaceChildren();
      return;
    }
    body.replaceChildren(
      ...record.parameters.map((parameter) => {
        const row = element("tr");
        row.append(element("th", label(parameter.name)));
        const value = typeof parameter.value === "boolean" ? (parameter.value ? "yes" : "no") : String(parameter.value);
        row.append(element("td", parameter.unit ? `${value} ${parameter.unit}` : value));
        row.firstChild.scope = "row";
        return row;
      }),
    );
  }

  renderConsumables(record) {
    const body = byId("monitor-consumables");
    setText("monitor-consumables-when", record === null ? "Never requested." : `As of ${when(record.device_time)} (instrument time).`);
    show("monitor-consumables-table", record !== null);
    if (record === null) {
      body.replaceChildren();
      return;
    }
    body.replaceChildren(
      ...record.items.map((item) => {
        const row = element("tr");
        const name = element("th", label(item.name));
        name.scope = "row";
        row.append(name, element("td", item.part));
        const remaining = element("td", `${item.remaining_percent}%`);
        if (item.remaining_percent < 10) remaining.className = "low";
        row.append(remaining, element("td", item.installed_on), element("td", item.serial || "-"));
        return row;
      }),
    );
  }

  renderRequests(requests) {
    const list = byId("monitor-requests");
    list.replaceChildren(
      ...requests.map((request) => {
        const words = STATUS_WORDS[request.status] ?? request.status;
        const refusal = request.refusal ? ` (${request.refusal})` : "";
        const reason = request.reason ? `: "${request.reason}"` : "";
        return element(
          "li",
          `${when(request.requested_at)} ${request.kind} asked by ${request.requested_by}${reason}, ${words}${refusal}`,
        );
      }),
    );
    show("monitor-requests-none", requests.length === 0);
  }

  async requestNow(kind) {
    const deviceId = this.deviceId;
    const generation = this.generation;
    const button = byId(`monitor-request-${kind}`);
    const status = `monitor-request-${kind}-status`;
    button.disabled = true;
    setText(status, "Asking the instrument...");
    const answer = await this.api("POST", devicePath(deviceId, "data-requests"), {
      kind,
      reason: byId("monitor-request-reason").value.trim(),
    });
    if (generation !== this.generation) return;
    if (answer.status === 202) {
      this.poll(kind, answer.data.request_id, Date.now());
      return;
    }
    button.disabled = false;
    if (answer.status === 401) {
      this.loginEnded();
      return;
    }
    const error = answer.data !== null && typeof answer.data.error === "string" ? answer.data.error : "";
    const messages = {
      0: "The relay does not answer. Try again.",
      400: `The request was refused: ${error}.`,
      403: "Your role may not ask instruments for data.",
      404: "This instrument is not known, or not yours to see.",
      409: `${error.charAt(0).toUpperCase()}${error.slice(1)}.`,
      503: "The relay cannot send requests right now. Try again shortly.",
    };
    setText(status, messages[answer.status] ?? `The request failed (${answer.status}).`);
  }

  poll(kind, requestId, startedAt) {
    const generation = this.generation;
    const status = `monitor-request-${kind}-status`;
    const button = byId(`monitor-request-${kind}`);
    setText(status, "Waiting for the instrument's answer...");
    const check = async () => {
      this.polls.delete(kind);
      if (generation !== this.generation) return;
      const answer = await this.api("GET", devicePath(this.deviceId, `data-requests/${encodeURIComponent(requestId)}`));
      if (generation !== this.generation) return;
      if (answer.status === 401) {
        this.loginEnded();
        return;
      }
      const state = answer.status === 200 ? answer.data.status : null;
      if (state === "pending" && Date.now() - startedAt < POLL_LIMIT_MS) {
        this.polls.set(kind, setTimeout(check, POLL_MS));
        return;
      }
      button.disabled = false;
      if (state === "answered") setText(status, `Answered at ${when(answer.data.finished_at)}.`);
      else if (state === "refused") setText(status, `The instrument refused: ${answer.data.refusal || "no reason given"}.`);
      else if (state === "lapsed") setText(status, "The instrument did not answer in time.");
      else if (state === "pending") setText(status, "Still waiting; the answer will show here once it arrives.");
      else setText(status, `The request's state could not be read (${answer.status}).`);
      await this.loadSnapshots(generation);
    };
    this.polls.set(kind, setTimeout(check, POLL_MS));
  }

  // Exports -----------------------------------------------------------------------

  renderExports() {
    if (this.deviceId === null) return;
    const since = encodeURIComponent(daysAgoIso(this.rangeDays + 1));
    const links = [];
    for (const [dataset, words] of [
      ["alarms", "Alarms"],
      ["daily-stats", "Daily statistics"],
    ]) {
      for (const format of ["csv", "json"]) {
        const link = element("a", `${words} (${format.toUpperCase()})`);
        link.href = devicePath(this.deviceId, `exports/${dataset}?format=${format}&since=${since}`);
        link.download = "";
        link.className = "export-link";
        const item = element("li");
        item.append(link);
        links.push(item);
      }
    }
    byId("monitor-exports").replaceChildren(...links);
    setText("monitor-exports-range", `The last ${this.rangeDays} days (as the charts). Each export is recorded in the audit log.`);
  }

  // Remote sessions ------------------------------------------------------------------

  async loadSessions(generation) {
    const answer = await this.api("GET", devicePath(this.deviceId, "sessions?limit=50"));
    if (generation !== this.generation) return;
    if (answer.status !== 200) {
      this.failed(answer, "session history");
      return;
    }
    const sessions = answer.data.sessions;
    byId("monitor-sessions").replaceChildren(
      ...sessions.map((session) => {
        const row = element("tr");
        row.append(
          element("td", when(session.requested_at), "nowrap"),
          element("td", session.engineer),
          element("td", session.reason, "reason"),
          element("td", session.granted_at ? `by ${session.decided_by || "the instrument"}` : "not granted"),
          element("td", session.duration_s === null ? "-" : `${Math.round(session.duration_s / 60)} min`),
          element("td", session.end_reason ? endWords(END_WORDING, session.end_reason) : "live"),
        );
        return row;
      }),
    );
    show("monitor-sessions-table", sessions.length > 0);
    show("monitor-sessions-none", sessions.length === 0);
  }
}
