// Tunnel frames of a remote session: the browser's copy of relay/proto/tunnel.py.
//
// One frame per binary WebSocket message; a 5-byte header (type u8, stream id
// u32, big-endian), then a body whose last field, if it has a variable length,
// runs to the end of the message:
//
//   1 OPEN       cols u16, rows u16, channel (ASCII)
//   2 OPEN_OK    -
//   3 OPEN_FAIL  code u16, reason (UTF-8, at most 200 bytes)
//   4 DATA       payload (1..65531 bytes)
//   5 WINDOW     credit u32 (1..2^31-1)
//   6 EOF        -
//   7 CLOSE      code u16
//   8 RESIZE     cols u16, rows u16 (1..1000 each)
//
// decode() checks a frame as strictly as the Python codec does and throws a
// TunnelError for anything else; encode() refuses a frame it would not accept.
// Frames are plain objects: {type, streamId, ...fields}.

export const FrameType = Object.freeze({
  OPEN: 1,
  OPEN_OK: 2,
  OPEN_FAIL: 3,
  DATA: 4,
  WINDOW: 5,
  EOF: 6,
  CLOSE: 7,
  RESIZE: 8,
});

export const HEADER_BYTES = 5;
export const MAX_FRAME_BYTES = 64 * 1024;
export const MAX_DATA_BYTES = MAX_FRAME_BYTES - HEADER_BYTES;
export const MAX_STREAM_ID = 2 ** 31 - 1;
export const MAX_WINDOW_BYTES = 2 ** 31 - 1;
export const MAX_REASON_BYTES = 200;
export const MAX_TERMINAL_SIZE = 1000;
/** Credit of each direction of a stream at OPEN_OK (a protocol constant). */
export const INITIAL_WINDOW_BYTES = 256 * 1024;

const OPEN_FAIL_CODES = new Set([1, 2, 3, 4]);
const CLOSE_CODES = new Set([0, 1]);
const TCP_CHANNEL = /^tcp:([1-9][0-9]{0,4})$/;

// Body sizes: [fixed bytes, whether a variable field follows].
const LAYOUTS = new Map([
  [FrameType.OPEN, [4, true]],
  [FrameType.OPEN_OK, [0, false]],
  [FrameType.OPEN_FAIL, [2, true]],
  [FrameType.DATA, [0, true]],
  [FrameType.WINDOW, [4, false]],
  [FrameType.EOF, [0, false]],
  [FrameType.CLOSE, [2, false]],
  [FrameType.RESIZE, [4, false]],
]);

export class TunnelError extends Error {}

const utf8 = new TextEncoder();
const strictUtf8 = new TextDecoder("utf-8", { fatal: true });

function check(condition, message) {
  if (!condition) throw new TunnelError(message);
}

function isIntIn(value, low, high) {
  return Number.isInteger(value) && value >= low && value <= high;
}

function checkStreamId(streamId) {
  check(isIntIn(streamId, 1, MAX_STREAM_ID), `stream id ${streamId} is out of range`);
  check(streamId % 2 === 1, `stream id ${streamId} is even; the engineer opens odd ids`);
}

function checkSize(cols, rows) {
  check(
    isIntIn(cols, 1, MAX_TERMINAL_SIZE) && isIntIn(rows, 1, MAX_TERMINAL_SIZE),
    `terminal size ${cols}x${rows} is outside 1..${MAX_TERMINAL_SIZE}`,
  );
}

function checkChannel(channel, cols, rows) {
  if (channel === "shell") {
    checkSize(cols, rows);
    return;
  }
  const match = TCP_CHANNEL.exec(channel);
  check(match !== null && Number(match[1]) <= 65535, `bad channel ${JSON.stringify(channel)}`);
  check(cols === 0 && rows === 0, "a tcp channel has no terminal size");
}

function checkReason(reason) {
  check(utf8.encode(reason).length <= MAX_REASON_BYTES, "reason is too long");
  // C0, DEL and C1: a reason is shown to people, never as control sequences.
  check(!/[\u0000-\u001f\u007f-\u009f]/.test(reason), "reason holds control characters");
}

/** The wire form of frame, a Uint8Array. */
export function encode(frame) {
  checkStreamId(frame.streamId);
  let body;
  switch (frame.type) {
    case FrameType.OPEN: {
      checkChannel(frame.channel, frame.cols, frame.rows);
      body = new Uint8Array(4 + frame.channel.length);
      const view = new DataView(body.buffer);
      view.setUint16(0, frame.cols);
      view.setUint16(2, frame.rows);
      body.set(utf8.encode(frame.channel), 4);
      break;
    }
    case FrameType.OPEN_FAIL: {
      check(OPEN_FAIL_CODES.has(frame.code), `unknown OPEN_FAIL code ${frame.code}`);
      checkReason(frame.reason);
      const reason = utf8.encode(frame.reason);
      body = new Uint8Array(2 + reason.length);
      new DataView(body.buffer).setUint16(0, frame.code);
      body.set(reason, 2);
      break;
    }
    case FrameType.DATA:
      check(frame.payload instanceof Uint8Array, "payload must be a Uint8Array");
      check(
        frame.payload.length >= 1 && frame.payload.length <= MAX_DATA_BYTES,
        `payload is ${frame.payload.length} bytes, 1..${MAX_DATA_BYTES} allowed`,
      );
      body = frame.payload;
      break;
    case FrameType.WINDOW:
      check(isIntIn(frame.credit, 1, MAX_WINDOW_BYTES), `credit ${frame.credit} is out of range`);
      body = new Uint8Array(4);
      new DataView(body.buffer).setUint32(0, frame.credit);
      break;
    case FrameType.CLOSE:
      check(CLOSE_CODES.has(frame.code), `unknown CLOSE code ${frame.code}`);
      body = new Uint8Array(2);
      new DataView(body.buffer).setUint16(0, frame.code);
      break;
    case FrameType.RESIZE:
      checkSize(frame.cols, frame.rows);
      body = new Uint8Array(4);
      new DataView(body.buffer).setUint16(0, frame.cols);
      new DataView(body.buffer).setUint16(2, frame.rows);
      break;
    case FrameType.OPEN_OK:
    case FrameType.EOF:
      body = new Uint8Array(0);
      break;
    default:
      throw new TunnelError(`unknown frame type ${frame.type}`);
  }
  const data = new Uint8Array(HEADER_BYTES + body.length);
  const header = new DataView(data.buffer);
  header.setUint8(0, frame.type);
  header.setUint32(1, frame.streamId);
  data.set(body, HEADER_BYTES);
  return data;
}

/** Parse one frame from a whole message (ArrayBuffer or Uint8Array). */
export function decode(message) {
  const data = message instanceof Uint8Array ? message : new Uint8Array(message);
  check(data.length <= MAX_FRAME_BYTES, `frame is ${data.length} bytes, at most ${MAX_FRAME_BYTES}`);
  check(data.length >= HEADER_BYTES, "frame is shorter than its header");
  const view = new DataView(data.buffer, data.byteOffset, data.byteLength);
  const type = view.getUint8(0);
  const streamId = view.getUint32(1);
  const layout = LAYOUTS.get(type);
  check(layout !== undefined, `unknown frame type ${type}`);
  const [fixed, variable] = layout;
  const size = data.length - HEADER_BYTES;
  check(size >= fixed, `frame type ${type} is too short`);
  check(variable || size === fixed, `frame type ${type} has trailing bytes`);
  checkStreamId(streamId);
  const body = data.subarray(HEADER_BYTES);
  const u16 = (offset) => view.getUint16(HEADER_BYTES + offset);
  switch (type) {
    case FrameType.OPEN: {
      const rest = body.subarray(4);
      check(rest.every((byte) => byte < 0x80), "channel is not ASCII");
      const channel = String.fromCharCode(...rest);
      const frame = { type, streamId, cols: u16(0), rows: u16(2), channel };
      checkChannel(channel, frame.cols, frame.rows);
      return frame;
    }
    case FrameType.OPEN_FAIL: {
      const code = u16(0);
      check(OPEN_FAIL_CODES.has(code), `unknown OPEN_FAIL code ${code}`);
      const raw = body.subarray(2);
      check(raw.length <= MAX_REASON_BYTES, "reason is too long");
      let reason;
      try {
        reason = strictUtf8.decode(raw);
      } catch {
        throw new TunnelError("reason is not UTF-8");
      }
      checkReason(reason);
      return { type, streamId, code, reason };
    }
    case FrameType.DATA:
      check(size >= 1, "DATA without payload");
      return { type, streamId, payload: body.slice() };
    case FrameType.WINDOW: {
      const credit = view.getUint32(HEADER_BYTES);
      check(isIntIn(credit, 1, MAX_WINDOW_BYTES), `credit ${credit} is out of range`);
      return { type, streamId, credit };
    }
    case FrameType.CLOSE: {
      const code = u16(0);
      check(CLOSE_CODES.has(code), `unknown CLOSE code ${code}`);
      return { type, streamId, code };
    }
    case FrameType.RESIZE: {
      const frame = { type, streamId, cols: u16(0), rows: u16(2) };
      checkSize(frame.cols, frame.rows);
      return frame;
    }
    default: // OPEN_OK, EOF
      return { type, streamId };
  }
}
