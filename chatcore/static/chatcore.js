// chatcore.js: a small browser client for chatcore's protocol v1.
// Served by every chatcore ASGIApp at /chatcore.js:
// `import { ChatClient } from "/chatcore.js"`. Types: chatcore.d.ts.
//
// - splits JSON-lines frames, answers the server's pings;
// - request/reply by `ref` (join, leave, publish return Promises);
// - reconnects with exponential backoff and full jitter, honouring
//   `shutdown.reconnect_after_ms`, and never reconnects after a close that
//   says "don't" (1000, 1003, 1007, 1008, 1009, 4002);
// - treats a server silent for longer than its heartbeat promises (hello's
//   interval_ms + timeout_ms) as gone, and reconnects (a dead TCP connection
//   can otherwise look open for many minutes);
// - keeps a position {epoch, offset} per room, drops duplicate messages, and
//   rejoins its rooms after a reconnect with `since` = that position, so the
//   server replays what was missed (`recovered: true`) or says it cannot
//   (`recovered: false`);
// - tells the page when to reload a room: the `joined` event has `reset: true`
//   (first join, `recovered: false`, new epoch), and a `reset` event fires for
//   a live message of another epoch or after a gap in the offsets;
// - gives up when it never got in: `maxSignInAttempts` connection attempts in
//   a row that end before the server's hello (a browser cannot see the HTTP
//   401/403 of a refused handshake, only that it failed) end with status
//   "failed" and a `failed` event. Once signed in, it retries for ever.

const NO_RECONNECT = new Set([1000, 1003, 1007, 1008, 1009, 4002]);

export class ChatClient extends EventTarget {
  /**
   * @param {string} url  ws:// or wss:// URL, including ?user=…&token=…
   * @param {{minDelayMs?: number, maxDelayMs?: number, requestTimeoutMs?: number,
   *          maxSignInAttempts?: number}} options
   */
  constructor(url, options = {}) {
    super();
    this.url = url;
    this.minDelayMs = options.minDelayMs ?? 500;
    this.maxDelayMs = options.maxDelayMs ?? 30000;
    this.requestTimeoutMs = options.requestTimeoutMs ?? 10000;
    this.maxSignInAttempts = options.maxSignInAttempts ?? 3;
    this.status = "idle"; // idle | connecting | open | reconnecting | closed | failed
    this.user = null;
    this.rooms = new Map(); // room -> {epoch, offset}
    this._pending = new Map(); // ref -> {resolve, reject, timer}
    this._nextRef = 1;
    this._attempt = 0;
    this._serverDelayMs = null; // from `shutdown`
    this._stopped = false;
    this._ws = null;
    this._timer = null;
    this._silenceMs = null; // from hello.heartbeat: how long the server may be silent
    this._watchdog = null;
    this._signedIn = false; // a hello arrived since connect()
  }

  /** Open the connection (and keep it open until close()). */
  connect() {
    this._stopped = false;
    this._signedIn = false;
    this._attempt = 0;
    this._open();
  }

  /** Close for good (no reconnect). */
  close() {
    this._stopped = true;
    clearTimeout(this._timer);
    if (this._ws) this._ws.close(1000, "bye");
    this._setStatus("closed");
  }

  /** Join a room; resolves with the reply data ({room, epoch, offset, recovered?}). */
  join(room) {
    const known = this.rooms.get(room); // the position before this join, if any
    const fields = { room };
    if (known) fields.since = { epoch: known.epoch, offset: known.offset };
    // The position is settled while the reply's line is handled, before the
    // replayed messages that follow it (in the same frame or in later ones).
    return this.request("join", fields, (data) => this._noteJoin(room, known, data));
  }

  /** Leave a room. */
  async leave(room) {
    this.rooms.delete(room);
    return this.request("leave", { room });
  }

  /** Publish `data` (any JSON value) to a room; resolves with its offset. */
  async publish(room, data) {
    const reply = await this.request("publish", { room, data });
    return reply.offset;
  }

  /** Send a message of any type without waiting for a reply. */
  send(message) {
    if (this._ws && this._ws.readyState === WebSocket.OPEN) {
      this._ws.send(JSON.stringify(message));
      return true;
    }
    return false;
  }

  /**
   * Send a request with a fresh `ref`; resolves with the reply's data.
   * `onReply(data)`, if given, runs synchronously when the ok reply is handled,
   * before the next message of the same frame (a resolved promise would run
   * its callbacks only after the whole frame).
   */
  request(type, fields = {}, onReply = null) {
    const ref = this._nextRef++;
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this._pending.delete(ref);
        reject(new Error(`${type}: no reply within ${this.requestTimeoutMs} ms`));
      }, this.requestTimeoutMs);
      this._pending.set(ref, { resolve, reject, timer, onReply });
      if (!this.send({ ...fields, type, ref })) {
        clearTimeout(timer);
        this._pending.delete(ref);
        reject(new Error(`${type}: not connected`));
      }
    });
  }

  // -- internals ------------------------------------------------------------

  _emit(name, detail) {
    this.dispatchEvent(new CustomEvent(name, { detail }));
  }

  _setStatus(status) {
    if (this.status !== status) {
      this.status = status;
      this._emit("status", status);
    }
  }

  _open() {
    this._setStatus(this._signedIn ? "reconnecting" : "connecting");
    const ws = new WebSocket(this.url);
    this._ws = ws;
    ws.onopen = () => {};
    ws.onmessage = (event) => {
      for (const line of String(event.data).split("\n")) {
        if (line) this._handle(JSON.parse(line));
      }
      if (ws === this._ws) this._watch(ws);
    };
    ws.onclose = (event) => this._closed(ws, event.code, event.reason);
  }

  _handle(message) {
    switch (message.type) {
      case "hello":
        this.user = message.user;
        if (message.heartbeat) {
          this._silenceMs = message.heartbeat.interval_ms + message.heartbeat.timeout_ms;
        }
        this._attempt = 0;
        this._signedIn = true;
        this._serverDelayMs = null;
        this._setStatus("open");
        this._emit("hello", message);
        this._rejoin();
        break;
      case "ping":
        this.send({ type: "pong" });
        break;
      case "reply": {
        const pending = this._pending.get(message.ref);
        if (!pending) break;
        this._pending.delete(message.ref);
        clearTimeout(pending.timer);
        if (message.status === "ok") {
          if (pending.onReply) pending.onReply(message.data);
          pending.resolve(message.data);
        } else pending.reject(Object.assign(new Error(message.error.message), { code: message.error.code }));
        break;
      }
      case "message": {
        const position = this.rooms.get(message.room);
        if (!position) break; // a room we left
        const sameEpoch = position.epoch === message.epoch;
        if (sameEpoch && message.offset <= position.offset) break; // duplicate
        const gap = sameEpoch && message.offset > position.offset + 1;
        position.epoch = message.epoch;
        position.offset = message.offset;
        if (!sameEpoch || gap) {
          // The room's order started over, or messages went missing: reload.
          const { room, epoch, offset } = message;
          this._emit("reset", { room, epoch, offset, reason: sameEpoch ? "gap" : "epoch" });
        }
        this._emit("message", message);
        break;
      }
      case "shutdown":
        this._serverDelayMs = message.reconnect_after_ms;
        this._emit("shutdown", message);
        break;
      default:
        this._emit(message.type, message); // presence_state/_diff, bot, typing, error, app-defined
    }
  }

  _watch(ws) {
    clearTimeout(this._watchdog);
    if (this._silenceMs === null) return;
    this._watchdog = setTimeout(() => {
      this._closed(ws, 4000, "the server went silent"); // don't wait for a dead socket
      ws.close();
    }, this._silenceMs);
  }

  _noteJoin(room, known, data) {
    const recovered = known !== undefined && data.recovered === true && known.epoch === data.epoch;
    if (recovered) {
      // Keep the old position: the replayed messages that follow advance it.
      // (Jumping to data.offset would make them look like duplicates.)
      this.rooms.set(room, known);
    } else {
      // First join, or the server could not recover: start from the reply.
      this.rooms.set(room, { epoch: data.epoch, offset: data.offset });
    }
    this._emit("joined", { room, ...data, reset: !recovered });
  }

  _rejoin() {
    const ws = this._ws;
    for (const room of this.rooms.keys()) {
      this.join(room).catch((error) => {
        if (ws === this._ws) this._emit("error", { code: error.code ?? "internal", message: String(error.message) });
      });
    }
  }

  _closed(ws, code, reason) {
    if (ws !== this._ws) return;
    this._ws = null;
    clearTimeout(this._watchdog);
    for (const [ref, pending] of this._pending) {
      clearTimeout(pending.timer);
      pending.reject(new Error("connection closed"));
      this._pending.delete(ref);
    }
    this._emit("close", { code, reason });
    if (this._stopped || NO_RECONNECT.has(code)) {
      this._setStatus("closed");
      return;
    }
    if (!this._signedIn && this._attempt + 1 >= this.maxSignInAttempts) {
      // Never got in: a refused name or token, or no server there. Retrying
      // for ever would leave the user staring at "reconnecting".
      this._stopped = true;
      this._setStatus("failed");
      this._emit("failed", { code, reason, attempts: this._attempt + 1 });
      return;
    }
    let delay;
    if (this._serverDelayMs !== null) {
      delay = this._serverDelayMs; // the server spread these out for us
      this._serverDelayMs = null;
    } else {
      const cap = Math.min(this.maxDelayMs, this.minDelayMs * 2 ** this._attempt);
      delay = Math.random() * cap; // full jitter
    }
    this._attempt += 1;
    this._setStatus(this._signedIn ? "reconnecting" : "connecting");
    this._timer = setTimeout(() => this._open(), delay);
  }
}
