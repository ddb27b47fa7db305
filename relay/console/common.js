// Helpers shared by the engineers' console and the device page: the same
// countdown, the same warning and end wording, the same small DOM helpers.
// Text from the network is only ever set with textContent, never as HTML.

/** The element with this id (the pages' ids are fixed). */
export function byId(id) {
  const element = document.getElementById(id);
  if (element === null) throw new Error(`no element #${id}`);
  return element;
}

export function show(id, visible) {
  byId(id).hidden = !visible;
}

export function setText(id, text) {
  byId(id).textContent = text;
}

/** Seconds as a clock: "59:59", "1:00:00"; "0:00" at the end. */
export function clock(seconds) {
  const total = Math.max(0, Math.ceil(seconds));
  const hours = Math.floor(total / 3600);
  const minutes = Math.floor((total % 3600) / 60);
  const rest = String(total % 60).padStart(2, "0");
  if (hours > 0) return `${hours}:${String(minutes).padStart(2, "0")}:${rest}`;
  return `${minutes}:${rest}`;
}

/** A duration in words: whole minutes (rounded up) from one minute on, else seconds. */
export function span(seconds) {
  const total = Math.max(0, Math.ceil(seconds));
  return total >= 60 ? `${Math.ceil(total / 60)} min` : `${total} s`;
}

/** What both pages say at a T-10 / T-1 warning. */
export function warningText(secondsLeft) {
  return `${span(secondsLeft)} left in this session. It ends on its own at the limit.`;
}

/** An end reason in words, from one of the tables of end-wording.js. */
export function endWords(table, reason) {
  if (typeof reason !== "string" || reason === "") return "the session ended";
  return Object.hasOwn(table, reason) ? table[reason] : reason;
}

/**
 * A clock that counts down to a moment and writes the time left into an
 * element, four times a second (so it never lags by a whole second).
 */
export class Countdown {
  constructor(elementId, { onZero = null } = {}) {
    this.elementId = elementId;
    this.onZero = onZero;
    this.endMs = null;
    this.timer = null;
  }

  /** Count down to endMs (milliseconds since the epoch). */
  start(endMs) {
    this.endMs = endMs;
    if (this.timer === null) this.timer = setInterval(() => this.tick(), 250);
    this.tick();
  }

  tick() {
    if (this.endMs === null) return;
    const left = (this.endMs - Date.now()) / 1000;
    setText(this.elementId, clock(left));
    if (left <= 0 && this.onZero !== null) {
      const onZero = this.onZero;
      this.onZero = null;
      onZero();
    }
  }

  stop() {
    if (this.timer !== null) clearInterval(this.timer);
    this.timer = null;
    this.endMs = null;
  }
}
