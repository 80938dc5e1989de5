// pubsub.js: the browser client of trio-pubsub (wire protocol pubsub.v1).
//
// One dependency-free ES module, no build step:
//
//   import { PubSubClient } from "http://HOST:8766/client.js";
//   const client = new PubSubClient("ws://HOST:8765/ws", { token: async () => fetchToken() });
//   client.addEventListener("state", (e) => console.log(e.detail.state));
//   await client.connect();
//   const sub = await client.subscribe("chat.room1", {
//     presence: true,
//     onMessage: (m) => console.log(m.offset, m.data),
//     onGap: (g) => console.warn("lost", g.from, "to", g.to, g.epochChanged),
//     onJoin: (e) => console.log(e.client, "joined"),
//     onLeave: (e) => console.log(e.client, "left"),
//   });
//   const offset = await client.publish("chat.room1", { text: "hi" });
//
// Theory of operation
// -------------------
// The client keeps one WebSocket. When it drops, the client waits (exponential backoff with
// full jitter, or the server's `reconnect_after_ms=N` hint from a 1001 close, plus jitter),
// asks for a token again (the token may be an async function), reconnects, and subscribes
// again to everything it was subscribed to. An exact topic is resubscribed with `since`, the
// offset and epoch of the last message it delivered, so the server replays what was missed;
// messages are delivered once, in offset order (duplicates are dropped by offset), and whatever
// the server can no longer replay is reported to `onGap` as an exact range of offsets, with
// `epochChanged: true` when the topic's history was lost altogether (a broker restart with
// in-memory history). A wildcard subscription cannot be resumed: on reconnect its `onGap` is
// called with `possible: true` and `from`/`to` null.
//
// A gap report: {topic, from, to (the lost offsets, inclusive, in `epoch`; null when none are
// known), epochChanged, possible, reason ("not_recovered", "epoch_changed",
// "wildcard_reconnect", "offset_jump", "skipped" (a `latest` topic sent only the newest while
// this client was behind), as the Python SDK's Gap.reason), previous ({offset,
// epoch} last delivered), epoch}.
//
// Browsers cannot set headers on a WebSocket, so the token travels as `?token=` in the URL
// (option `tokenIn: "query"`, the default) or in an `auth` frame once the socket is open
// (`tokenIn: "frame"`, which keeps it out of URLs and logs). A token given as a function is
// called before every connection and again shortly before the current token expires; the fresh
// token is sent with the `auth` op, so the connection lives on.
//
// With `shared: true` the tabs of one origin and user share one WebSocket (held by a
// SharedWorker or a leader tab; see client-shared.js, loaded only in that mode): this client
// then runs unchanged over a virtual socket to it.
//
// Browsers answer the server's WebSocket pings by themselves but never show them to scripts, so
// the client sends a `ping` op when the connection has been silent for `ping_interval` seconds
// and drops the connection when no answer comes within `pongTimeoutMs`.

export const VERSION = "0.1.0";
export const SUBPROTOCOL = "pubsub.v1";

/** An error reply from the server (`code` is the protocol's error code), or a client-side
 * failure: `disconnected` (the connection dropped before the reply), `timeout`, `closed`. */
export class PubSubError extends Error {
  constructor(code, message) {
    super(message || code);
    this.name = "PubSubError";
    this.code = code;
  }
}

/** True when `pattern` (which may hold `*` and a trailing `>`) matches the exact `topic`. */
export function topicMatches(pattern, topic) {
  const p = pattern.split(".");
  const t = topic.split(".");
  for (let i = 0; i < p.length; i++) {
    if (p[i] === ">") return i === p.length - 1 && t.length > i;
    if (i >= t.length) return false;
    if (p[i] !== "*" && p[i] !== t[i]) return false;
  }
  return p.length === t.length;
}

/** True when `topic` holds a wildcard segment. */
export function isPattern(topic) {
  return topic.split(".").some((s) => s === "*" || s === ">");
}

/** The WebSocket URL of the broker whose operations listener served this module. */
export async function discoverUrl() {
  const resp = await fetch(new URL("/client/config", import.meta.url), { cache: "no-store" });
  if (!resp.ok) throw new PubSubError("unavailable", `client config: HTTP ${resp.status}`);
  const cfg = await resp.json();
  const host = new URL(import.meta.url).hostname;
  const h = host.includes(":") && !host.startsWith("[") ? `[${host}]` : host;
  return `${cfg.ws_scheme || "ws"}://${h}:${cfg.ws_port}/ws`;
}

export const STATES = ["disconnected", "connecting", "connected", "reconnecting", "closed"];
// Close codes after which reconnecting with the same credentials cannot help.
const FATAL_WITH_FIXED_TOKEN = new Set([1008, 4001, 4003]);

/** One subscription: to an exact topic (resumable) or to a wildcard pattern. */
export class Subscription {
  constructor(client, topic, options) {
    this.client = client;
    this.topic = topic;
    this.wildcard = isPattern(topic);
    this.presence = Boolean(options.presence);
    this.onMessage = options.onMessage || null;
    this.onGap = options.onGap || null;
    this.onJoin = options.onJoin || null;
    this.onLeave = options.onLeave || null;
    this.onError = options.onError || null;
    /** Offset of the last message delivered (or the topic's latest offset when subscribed). */
    this.offset = options.since ? options.since.offset : null;
    /** Epoch of `offset`. */
    this.epoch = options.since ? options.since.epoch : null;
    /** "pending" until the server accepts it, "subscribed", then "unsubscribed". */
    this.state = "pending";
    this._everSubscribed = false;
    this._ready = null;
    this._seen = new Map(); // wildcard: topic -> last {epoch, offset} delivered
  }

  /** The position to resume from: `{offset, epoch}`, or null when unknown (or a wildcard). */
  get position() {
    if (this.wildcard || this.epoch === null || this.offset === null) return null;
    return { offset: this.offset, epoch: this.epoch };
  }

  /** Stop receiving messages; resolves once the server has answered (or at once offline). */
  unsubscribe() {
    return this.client.unsubscribe(this.topic);
  }
}

/**
 * A connection to the broker that survives drops. Events (an EventTarget; `detail` holds the
 * payload): `state` {state, previous}, `welcome` {client, expires_at, node, worker, ...},
 * `disconnect` {code, reason, willReconnect, delayMs}, `message` (every message frame, once
 * as it arrives, before the subscriptions' onMessage; a replay after a reconnect may bring an
 * offset again, which the subscriptions skip),
 * `gap` (every gap report), `error` {error} (errors not tied to a request).
 */
export class PubSubClient extends EventTarget {
  /**
   * @param {string} url  `ws://HOST:PORT/ws` (`http(s)://` is turned into `ws(s)://`); null to
   *   ask the broker that served this module (GET /client/config); or the options object
   *   itself, with a `url` key.
   * @param {object} options
   *   token: a string, or a function returning a token or a promise of one; omitted for
   *     anonymous access.
   *   tokenIn: "query" (default, `?token=`) or "frame" (an `auth` op after the socket opens).
   *   reconnect (true), minDelayMs (250), maxDelayMs (15000): the reconnect backoff.
   *   requestTimeoutMs (10000): how long a request waits for its reply, or for a connection.
   *   refreshMarginS (30): refresh a token this long before it expires (at most half its life).
   *   pongTimeoutMs (10000), WebSocket (globalThis.WebSocket).
   *   shared (false): true to share one connection among all the tabs of this origin that use
   *     the same URL and user (see "Sharing one connection between tabs" below); "worker" or
   *     "leader" to ask for one mechanism. Where the browser can do neither, the client keeps
   *     a connection of its own (`sharing` says which it got: "worker", "leader" or null).
   */
  constructor(url, options = {}) {
    super();
    if (url !== null && typeof url === "object" && !(url instanceof URL)) {
      options = url; // new PubSubClient({ url, token, ... })
      url = options.url;
    }
    // Without a URL, the broker that served this module says where its WebSocket listener is.
    this.url = url ? String(url).replace(/^http(s?):/, "ws$1:") : null;
    this.options = {
      token: null,
      tokenIn: "query",
      reconnect: true,
      minDelayMs: 250,
      maxDelayMs: 15000,
      requestTimeoutMs: 10000,
      refreshMarginS: 30,
      pongTimeoutMs: 10000,
      WebSocket: globalThis.WebSocket,
      shared: false,
      ...options,
    };
    this.state = "disconnected";
    /** From the last welcome: who we are and who serves us. */
    this.clientId = null;
    this.expiresAt = null;
    this.node = null;
    this.worker = null;
    this.subscriptions = new Map();
    this._ws = null;
    this._nextId = 1;
    this._pending = new Map();
    this._attempt = 0;
    this._timers = new Set();
    this._refreshTimer = null;
    this._heartbeatTimer = null;
    this._lastReceived = 0;
    this._pingInterval = 20;
    this._connectPromise = null;
    this._connectSettle = null;
    this._waiters = [];
    this._stableTimer = null;
    this._everConnected = false;
    /** With `shared`: the mechanism in use ("worker", "leader"), or null (a socket of its own). */
    this.sharing = null;
  }

  // -- public API ------------------------------------------------------------------------------

  /** Start connecting (and keep reconnecting). Resolves at the first welcome; rejects if the
   * client is closed first, or the first attempt fails in a way reconnecting cannot fix. */
  connect() {
    if (this.state === "closed") return Promise.reject(new PubSubError("closed", "client closed"));
    if (this.state === "connected") return Promise.resolve();
    if (!this._connectPromise) {
      this._connectPromise = new Promise((resolve, reject) => {
        this._connectSettle = { resolve, reject };
      });
      this._connectPromise.catch(() => {});
    }
    const promise = this._connectPromise;
    if (this.state === "disconnected") this._open();
    return promise;
  }

  /** Close for good: no reconnect; pending requests fail with `closed`. */
  close() {
    if (this.state === "closed") return;
    this._setState("closed");
    this._clearTimers();
    const ws = this._ws;
    this._ws = null;
    if (ws) {
      this._detach(ws);
      try {
        ws.close(1000, "client closed");
      } catch (_) {
        // already closing
      }
    }
    this._failPending(new PubSubError("closed", "client closed"));
    this._settleConnect(new PubSubError("closed", "client closed"));
    for (const w of this._waiters.splice(0)) w.reject(new PubSubError("closed", "client closed"));
  }

  /**
   * Subscribe to a topic or a wildcard pattern. Options: presence (join/leave events; exact
   * topics only), since {offset, epoch} (resume from there; exact topics only),
   * onMessage(msg, subscription) (a publication matching several subscriptions reaches each
   * one's onMessage once),
   * onGap({topic, from, to, epochChanged, possible}), onJoin({topic, client}),
   * onLeave({topic, client}), onError(PubSubError) (a later resubscription was refused).
   * Resolves with the Subscription once the server accepted it (waiting for a connection if
   * needed); rejects with the server's error (`forbidden`, `bad_topic`, ...; with presence also
   * `not_tracked`, when the broker keeps no presence for the topic).
   */
  subscribe(topic, options = {}) {
    if (typeof options === "function") options = { onMessage: options };
    if (this.state === "closed") return Promise.reject(new PubSubError("closed", "client closed"));
    if (this.subscriptions.has(topic)) {
      return Promise.reject(new PubSubError("bad_request", `already subscribed to ${topic}`));
    }
    const sub = new Subscription(this, topic, options);
    this.subscriptions.set(topic, sub);
    sub._ready = new Promise((resolve, reject) => {
      sub._settle = { resolve, reject };
    });
    if (this.state === "connected") this._sendSubscribe(sub, false);
    else if (this.state === "disconnected") this.connect().catch(() => {});
    return sub._ready;
  }

  /** Stop a subscription. Messages stop at once; resolves when the server has answered. */
  async unsubscribe(topic) {
    const sub = this.subscriptions.get(topic);
    if (!sub) return;
    this.subscriptions.delete(topic);
    sub.state = "unsubscribed";
    if (sub._settle) {
      sub._settle.reject(new PubSubError("closed", "unsubscribed"));
      sub._settle = null;
    }
    if (this.state === "connected" && sub._everSubscribed) {
      try {
        await this._request({ op: "unsubscribe", topic });
      } catch (err) {
        if (!(err instanceof PubSubError) || err.code !== "not_subscribed") throw err;
      }
    }
  }

  /** Publish `data` (any JSON value) on an exact topic. Resolves with the offset. */
  async publish(topic, data) {
    const reply = await this._request({ op: "publish", topic, data });
    return reply.offset;
  }

  /** What the server still holds of a topic: {messages, offset, epoch, recovered?, missed?}.
   * Options: since {offset, epoch}; limit (1..1000): the oldest N after `since`, or instead
   * last (1..1000): the newest N (both at once reject with `bad_request`). */
  async history(topic, { since, limit, last } = {}) {
    const frame = { op: "history", topic };
    if (since) frame.since = { offset: since.offset, epoch: since.epoch };
    if (limit !== undefined) frame.limit = limit;
    if (last !== undefined) frame.last = last;
    const { id: _id, ok: _ok, ...reply } = await this._request(frame);
    return reply;
  }

  /** The client ids subscribed to an exact topic, on every worker and node. Presence is opt-in
   * on the broker: rejects with `forbidden` (the token may not read it) or `not_tracked`. */
  async presence(topic) {
    const reply = await this._request({ op: "presence", topic });
    return reply.clients;
  }

  /** Round trip to the server; resolves with the time it took in milliseconds. */
  async ping() {
    const start = performance.now();
    await this._request({ op: "ping" });
    return performance.now() - start;
  }

  /** addEventListener with the payload as argument; returns a function that removes it. */
  on(type, fn) {
    const listener = (event) => fn(event.detail);
    this.addEventListener(type, listener);
    return () => this.removeEventListener(type, listener);
  }

  // -- requests -------------------------------------------------------------------------------

  async _request(frame) {
    if (this.state === "closed") throw new PubSubError("closed", "client closed");
    if (this.state !== "connected") await this._whenConnected();
    return this._send(frame);
  }

  _send(frame) {
    const id = this._nextId++;
    const ws = this._ws;
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this._pending.delete(id);
        reject(new PubSubError("timeout", `no reply to ${frame.op} in time`));
      }, this.options.requestTimeoutMs);
      this._pending.set(id, { resolve, reject, timer, ws });
      try {
        ws.send(JSON.stringify({ ...frame, id }));
      } catch (err) {
        clearTimeout(timer);
        this._pending.delete(id);
        reject(new PubSubError("disconnected", String(err)));
      }
    });
  }

  _whenConnected() {
    if (this.state === "connected") return Promise.resolve();
    if (this.state === "disconnected") this.connect().catch(() => {});
    return new Promise((resolve, reject) => {
      const waiter = { resolve, reject };
      const timer = setTimeout(() => {
        this._waiters = this._waiters.filter((w) => w !== waiter);
        reject(new PubSubError("timeout", "not connected in time"));
      }, this.options.requestTimeoutMs);
      waiter.resolve = () => {
        clearTimeout(timer);
        resolve();
      };
      waiter.reject = (err) => {
        clearTimeout(timer);
        reject(err);
      };
      this._waiters.push(waiter);
    });
  }

  _failPending(error, ws) {
    for (const [id, p] of this._pending) {
      if (ws && p.ws !== ws) continue;
      clearTimeout(p.timer);
      this._pending.delete(id);
      p.reject(error);
    }
  }

  // -- connection lifecycle -------------------------------------------------------------------

  _setState(state) {
    if (state === this.state) return;
    const previous = this.state;
    this.state = state;
    this._emit("state", { state, previous });
  }

  _emit(type, detail) {
    try {
      this.dispatchEvent(new CustomEvent(type, { detail }));
    } catch (err) {
      console.error("pubsub: an event listener failed", err);
    }
  }

  _call(fn, ...args) {
    if (!fn) return;
    try {
      fn(...args);
    } catch (err) {
      console.error("pubsub: a callback failed", err);
      this._emit("error", { error: err });
    }
  }

  _later(fn, ms) {
    const timer = setTimeout(() => {
      this._timers.delete(timer);
      fn();
    }, ms);
    this._timers.add(timer);
    return timer;
  }

  _clearTimers() {
    for (const t of this._timers) clearTimeout(t);
    this._timers.clear();
    this._refreshTimer = null;
    this._heartbeatTimer = null;
    this._stableTimer = null;
  }

  _settleConnect(error) {
    // connect() waits for the next welcome: once settled, a later call waits for the one after.
    const settle = this._connectSettle;
    this._connectSettle = null;
    this._connectPromise = null;
    if (!settle) return;
    if (error) settle.reject(error);
    else settle.resolve();
  }

  async _getToken() {
    const token = this.options.token;
    if (typeof token === "function") return await token();
    return token;
  }

  async _open() {
    if (this.state === "closed") return;
    // As the Python SDK: "connecting" until a first welcome, "reconnecting" after a loss.
    this._setState(this._everConnected ? "reconnecting" : "connecting");
    let token;
    try {
      token = await this._getToken();
    } catch (err) {
      this._emit("error", { error: err });
      this._scheduleReconnect(null);
      return;
    }
    if (this.state === "closed") return;
    if (!this.url) {
      try {
        this.url = await discoverUrl();
      } catch (err) {
        this._emit("error", { error: err });
        this._scheduleReconnect(null);
        return;
      }
    }
    // Shared mode: a virtual socket to the hub that holds the one connection (it gets the token
    // in its URL, which never leaves the browser, and applies `tokenIn` upstream itself).
    const SocketClass = this.options.shared ? await this._sharedSocketClass() : null;
    if (this.state === "closed") return;
    let ws;
    try {
      let url = this.url;
      if (token && (this.options.tokenIn === "query" || SocketClass)) {
        const u = new URL(url);
        u.searchParams.set("token", token);
        url = u.toString();
      }
      ws = new (SocketClass || this.options.WebSocket)(url, [SUBPROTOCOL]);
    } catch (err) {
      this._emit("error", { error: err });
      this._scheduleReconnect(null);
      return;
    }
    this._ws = ws;
    ws.onopen = () => {
      this._lastReceived = Date.now();
      if (token && this.options.tokenIn === "frame" && !SocketClass) {
        ws.send(JSON.stringify({ op: "auth", token }));
      }
    };
    ws.onmessage = (event) => this._onFrame(ws, event.data);
    ws.onerror = () => {
      // Browsers hide the reason (a refused handshake looks like any other failure); the
      // close event that follows carries what there is.
    };
    ws.onclose = (event) => this._onClose(ws, event.code, event.reason);
  }

  _detach(ws) {
    ws.onopen = ws.onmessage = ws.onerror = ws.onclose = null;
  }

  _onClose(ws, code, reason) {
    if (ws !== this._ws) return;
    this._detach(ws);
    this._ws = null;
    this._clearTimers();
    this._failPending(new PubSubError("disconnected", `connection closed (${code})`), ws);
    for (const sub of this.subscriptions.values()) {
      if (sub.state === "subscribed") sub.state = "pending";
    }
    if (this.state === "closed") return;
    const fixedToken = typeof this.options.token !== "function";
    const fatal =
      !this.options.reconnect || (fixedToken && FATAL_WITH_FIXED_TOKEN.has(code));
    if (fatal) {
      this._emit("disconnect", { code, reason, willReconnect: false, delayMs: null });
      const error = new PubSubError("closed", `connection closed (${code} ${reason || ""})`);
      this._settleConnect(error);
      this.close();
      return;
    }
    const delay = this._scheduleReconnect(reason);
    this._emit("disconnect", { code, reason, willReconnect: true, delayMs: delay });
  }

  /** A delay before retry number `attempt`: full jitter under an exponential ceiling. */
  _backoffMs(attempt) {
    const o = this.options;
    return Math.random() * Math.min(o.maxDelayMs, o.minDelayMs * 2 ** Math.min(attempt, 30));
  }

  _scheduleReconnect(reason) {
    if (this.state === "closed") return null;
    this._setState(this._everConnected ? "reconnecting" : "connecting");
    let delay = this._backoffMs(this._attempt);
    // A server going away says when to come back (`reconnect_after_ms=N` in a 1001 reason);
    // the jitter on top spreads the returning clients.
    const hint = /reconnect_after_ms=(\d+)/.exec(reason || "");
    if (hint) delay += Number(hint[1]);
    this._attempt += 1;
    this._later(() => this._open(), delay);
    return Math.round(delay);
  }

  // -- frames ---------------------------------------------------------------------------------

  _onFrame(ws, raw) {
    if (ws !== this._ws) return;
    this._lastReceived = Date.now();
    let frame;
    try {
      frame = JSON.parse(raw);
    } catch (_) {
      this._emit("error", { error: new PubSubError("bad_request", "server sent non-JSON") });
      return;
    }
    if (frame === null || typeof frame !== "object") return;
    if (frame.id !== undefined && frame.id !== null && "ok" in frame) {
      const p = this._pending.get(frame.id);
      if (!p) return;
      this._pending.delete(frame.id);
      clearTimeout(p.timer);
      if (frame.ok) p.resolve(frame);
      else p.reject(new PubSubError(frame.error?.code || "internal", frame.error?.message));
      return;
    }
    switch (frame.op) {
      case "message":
        this._onMessage(frame);
        break;
      case "skipped":
        this._onSkipped(frame);
        break;
      case "join":
      case "leave": {
        const sub = this.subscriptions.get(frame.topic);
        if (sub && sub.presence) {
          this._call(frame.op === "join" ? sub.onJoin : sub.onLeave, {
            topic: frame.topic,
            client: frame.client,
          });
        }
        this._emit(frame.op, { topic: frame.topic, client: frame.client });
        break;
      }
      case "welcome":
        this._onWelcome(frame);
        break;
      default:
        if (frame.ok === false) {
          const error = new PubSubError(frame.error?.code || "internal", frame.error?.message);
          this._emit("error", { error });
        }
    }
  }

  _onWelcome(frame) {
    this.clientId = frame.client;
    this.expiresAt = frame.expires_at ?? null;
    this.node = frame.node ?? null;
    this.worker = frame.worker ?? null;
    if (typeof frame.ping_interval === "number" && frame.ping_interval > 0) {
      this._pingInterval = frame.ping_interval;
    }
    if (this.state === "connected") {
      // a welcome after an in-band token refresh: nothing else changes
      this._scheduleRefresh();
      return;
    }
    this._everConnected = true;
    this._setState("connected");
    this._stableTimer = this._later(() => {
      this._attempt = 0;
    }, 5000);
    this._emit("welcome", frame);
    this._settleConnect(null);
    for (const w of this._waiters.splice(0)) w.resolve();
    for (const sub of this.subscriptions.values()) this._sendSubscribe(sub, sub._everSubscribed);
    this._scheduleRefresh();
    this._scheduleHeartbeat();
  }

  _sendSubscribe(sub, isResubscribe) {
    const frame = { op: "subscribe", topic: sub.topic };
    const since = sub.position;
    if (since) frame.since = since;
    if (sub.presence) frame.presence = true;
    const ws = this._ws;
    this._send(frame).then(
      (reply) => {
        if (ws !== this._ws) return;
        if (this.subscriptions.get(sub.topic) !== sub) {
          // unsubscribed while the server was subscribing it: undo it there too
          if (!this.subscriptions.has(sub.topic)) {
            this._send({ op: "unsubscribe", topic: sub.topic }).catch(() => {});
          }
          return;
        }
        sub.state = "subscribed";
        sub._everSubscribed = true;
        sub._retries = 0;
        if (sub.wildcard) {
          if (isResubscribe) {
            this._gap(sub, {
              topic: sub.topic,
              from: null,
              to: null,
              epochChanged: false,
              possible: true,
              reason: "wildcard_reconnect",
            });
          }
        } else if (since && reply.recovered === false) {
          const missed = reply.missed || { from: since.offset + 1, to: reply.offset };
          const epochChanged = reply.epoch !== since.epoch;
          sub.epoch = reply.epoch;
          sub.offset = missed.to;
          const known = missed.to >= missed.from;
          this._gap(sub, {
            topic: sub.topic,
            from: known ? missed.from : null,
            to: known ? missed.to : null,
            epochChanged,
            possible: false,
            reason: epochChanged ? "epoch_changed" : "not_recovered",
            previous: since,
            previousEpoch: since.epoch,
            epoch: reply.epoch,
          });
        } else if (!since) {
          sub.epoch = reply.epoch;
          sub.offset = reply.offset;
        }
        if (sub._settle) {
          sub._settle.resolve(sub);
          sub._settle = null;
        }
      },
      (err) => {
        if (this.subscriptions.get(sub.topic) !== sub) return;
        if (err.code === "disconnected" || err.code === "closed") return; // retried on reconnect
        if (err.code === "timeout" && ws === this._ws && ws) {
          // the connection is not answering: drop it and resubscribe on the next one
          this._dropConnection(ws, "subscribe timed out");
          return;
        }
        if (
          isResubscribe &&
          sub._everSubscribed &&
          (err.code === "rate_limited" || err.code === "unavailable") &&
          ws === this._ws &&
          ws
        ) {
          // Not now (the server's read budget for `since` replays is spent, or its bus is
          // down): ask again after a backoff, with the same position; the subscription stays.
          sub._retries = (sub._retries || 0) + 1;
          this._later(() => {
            if (ws === this._ws && this.subscriptions.get(sub.topic) === sub) {
              this._sendSubscribe(sub, true);
            }
          }, this._backoffMs(sub._retries));
          return;
        }
        this.subscriptions.delete(sub.topic);
        sub.state = "unsubscribed";
        if (sub._settle) {
          sub._settle.reject(err);
          sub._settle = null;
        } else {
          this._call(sub.onError, err);
          this._emit("error", { error: err, topic: sub.topic });
        }
      },
    );
  }

  _gap(sub, gap) {
    this._call(sub.onGap, gap);
    this._emit("gap", gap);
  }

  _onMessage(frame) {
    const msg = {
      topic: frame.topic,
      offset: frame.offset,
      epoch: frame.epoch,
      from: frame.from ?? null,
      data: frame.data,
    };
    this._emit("message", msg);
    // The broker sends a publication once per connection, however many of its subscriptions
    // match it. Every matching subscription is a listener of its own: each one's onMessage is
    // called once, in the order the subscriptions were made, with the same message object
    // and the subscription it came through. One that has already delivered the offset (a
    // replay overlapping live traffic) skips it.
    for (const sub of this.subscriptions.values()) {
      if (sub.wildcard) {
        if (sub.state !== "unsubscribed" && topicMatches(sub.topic, msg.topic)) {
          this._deliverWildcard(sub, msg);
        }
      } else if (sub.topic === msg.topic && sub.state === "subscribed") {
        // Only once the server has answered the (re)subscription: what came before the
        // answer through a wildcard subscription is replayed after it.
        this._deliverExact(sub, msg);
      }
    }
  }

  // A `latest` topic (a [[delivery]] rule of the broker) sends a client that fell behind only
  // the newest publication, after {op: "skipped", topic, from, to, epoch}. It is reported to
  // onGap with reason "skipped", and the subscription's position moves past the range: the
  // next message follows on, and a reconnect resumes after it instead of replaying it (the
  // range may still be in the topic's history, for `history` with `since`).
  _onSkipped(frame) {
    const gap = {
      topic: frame.topic,
      from: frame.from,
      to: frame.to,
      epochChanged: false,
      possible: false,
      reason: "skipped",
      previous: null,
      epoch: frame.epoch,
    };
    const exact = this.subscriptions.get(frame.topic);
    if (exact && !exact.wildcard && exact.state === "subscribed") {
      const behind = exact.epoch === frame.epoch && exact.offset !== null;
      if (!(behind && frame.to <= exact.offset)) {
        if (exact.offset !== null) gap.previous = { offset: exact.offset, epoch: exact.epoch };
        exact.epoch = frame.epoch;
        exact.offset = frame.to;
        this._gap(exact, { ...gap });
      }
    }
    for (const sub of this.subscriptions.values()) {
      if (sub.wildcard && sub.state !== "unsubscribed" && topicMatches(sub.topic, frame.topic)) {
        this._gap(sub, { ...gap });
      }
    }
  }

  _deliverWildcard(sub, msg) {
    // An exact subscription's replay also matches the pattern: deliver each offset once.
    const last = sub._seen.get(msg.topic);
    if (last && last.epoch === msg.epoch && msg.offset <= last.offset) return;
    if (sub._seen.size >= 10000) sub._seen.clear(); // bounded; at worst a rare duplicate
    sub._seen.set(msg.topic, { epoch: msg.epoch, offset: msg.offset });
    this._call(sub.onMessage, msg, sub);
  }

  _deliverExact(sub, msg) {
    if (sub.epoch === msg.epoch && sub.offset !== null) {
      if (msg.offset <= sub.offset) return; // already delivered
      if (msg.offset > sub.offset + 1) {
        this._gap(sub, {
          topic: sub.topic,
          from: sub.offset + 1,
          to: msg.offset - 1,
          epochChanged: false,
          possible: false,
          reason: "offset_jump",
          previous: { offset: sub.offset, epoch: sub.epoch },
          epoch: msg.epoch,
        });
      }
    } else if (sub.epoch !== null && sub.epoch !== msg.epoch) {
      // the history was lost while we stayed connected (a bus restart)
      this._gap(sub, {
        topic: sub.topic,
        from: msg.offset > 1 ? 1 : null,
        to: msg.offset > 1 ? msg.offset - 1 : null,
        epochChanged: true,
        possible: false,
        reason: "epoch_changed",
        previous: { offset: sub.offset, epoch: sub.epoch },
        previousEpoch: sub.epoch,
        epoch: msg.epoch,
      });
    }
    sub.epoch = msg.epoch;
    sub.offset = msg.offset;
    this._call(sub.onMessage, msg, sub);
  }

  // -- sharing one connection between tabs ---------------------------------------------------
  //
  // With `shared`, the client runs unchanged over a virtual socket: client-shared.js (served
  // next to this module, loaded only in this mode) multiplexes the virtual sockets of every
  // tab onto one WebSocket held by a SharedWorker or by a leader tab. Subscriptions, callbacks,
  // positions and reconnects stay per tab; when the holder goes away the virtual socket closes
  // and this client resubscribes with `since` like after any drop.

  async _sharedSocketClass() {
    if (this._sharedSocket === undefined) {
      this._sharedSocket = null;
      this.sharing = null;
      try {
        const shared = await import(new URL("./client-shared.js", import.meta.url));
        const workerUrl = new URL("./client-worker.js", import.meta.url).href;
        const mechanism = shared.sharingMechanism(workerUrl, this.options.shared);
        if (mechanism) {
          this.sharing = mechanism;
          this._sharedSocket = shared.sharedSocket({
            workerUrl,
            mechanism,
            tokenIn: this.options.tokenIn,
            onChannel: (used) => {
              this.sharing = used;
            },
          });
        }
      } catch (err) {
        this._emit("error", { error: err });
      }
    }
    return this._sharedSocket;
  }

  // -- keeping the connection alive and authenticated -----------------------------------------

  _scheduleHeartbeat() {
    const interval = this._pingInterval * 1000;
    const ws = this._ws;
    this._heartbeatTimer = this._later(async () => {
      if (ws !== this._ws || this.state !== "connected") return;
      if (Date.now() - this._lastReceived >= interval - 50) {
        const timer = this._later(
          () => this._dropConnection(ws, "no answer to ping"),
          this.options.pongTimeoutMs,
        );
        try {
          await this._send({ op: "ping" });
        } catch (_) {
          // the close handler or the timer deals with it
        }
        clearTimeout(timer);
        this._timers.delete(timer);
      }
      if (ws === this._ws) this._scheduleHeartbeat();
    }, Math.max(1000, interval / 2));
  }

  _dropConnection(ws, reason) {
    if (ws !== this._ws) return;
    try {
      ws.close(4000, reason);
    } catch (_) {
      // ignore
    }
    // A dead TCP connection may take minutes to report its close: act now.
    this._onClose(ws, 1006, reason);
  }

  _scheduleRefresh() {
    if (this._refreshTimer) {
      clearTimeout(this._refreshTimer);
      this._timers.delete(this._refreshTimer);
      this._refreshTimer = null;
    }
    if (typeof this.options.token !== "function" || !this.expiresAt) return;
    const lifeMs = this.expiresAt * 1000 - Date.now();
    const margin = Math.min(this.options.refreshMarginS * 1000, lifeMs / 2);
    const ws = this._ws;
    this._refreshTimer = this._later(() => this._refresh(ws), Math.max(1000, lifeMs - margin));
  }

  async _refresh(ws) {
    if (ws !== this._ws || this.state !== "connected") return;
    try {
      const token = await this._getToken();
      const reply = await this._send({ op: "auth", token });
      if (ws !== this._ws) return;
      this.expiresAt = reply.expires_at ?? null;
      this._emit("refresh", { expires_at: this.expiresAt });
      this._scheduleRefresh();
    } catch (err) {
      this._emit("error", { error: err });
      // try again a little later while the current token still holds
      if (ws === this._ws) this._refreshTimer = this._later(() => this._refresh(ws), 5000);
    }
  }
}

export default PubSubClient;
