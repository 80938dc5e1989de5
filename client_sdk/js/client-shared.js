// client-shared.js: one WebSocket for all the tabs of an origin (the `shared` option of
// /client.js). Served by the broker next to /client.js, which imports it only when asked to.
//
// Theory of operation
// -------------------
// Each tab keeps its own PubSubClient, with its own subscriptions, callbacks, reconnect logic
// and positions. In shared mode the client's "WebSocket" is a VirtualSocket: it speaks the same
// JSON frames, but to a *hub* instead of to the broker. The hub holds the one real WebSocket
// and multiplexes the tabs over it:
//
// - requests get a hub-wide id on the way up and their own id back on the way down;
// - a topic is subscribed upstream once, however many tabs subscribe to it, and unsubscribed
//   when the last of them leaves; every `message`, `join` and `leave` push goes to every tab
//   with a matching subscription;
// - a tab subscribing to a topic the hub already holds gets its reply from the hub (the hub's
//   position), and with `since` its missed messages from a `history` read, queued before what
//   arrives live meanwhile; so each tab resumes exactly, as it would on its own socket;
// - the `welcome` and errors not tied to a request go to every tab; after a tab refreshed the
//   token in-band, the other tabs get a `welcome` with the new expiry;
// - when the real WebSocket closes, every virtual socket closes with the same code and reason,
//   and each tab reconnects and resubscribes with `since` as usual.
//
// Where the hub lives:
// - in a SharedWorker (/client-worker.js, one per broker URL and user), when the page is on the
//   broker's own origin (a SharedWorker's script must be same-origin with the page);
// - otherwise in one *leader* tab, elected with the Web Locks API; the other tabs reach it over
//   a BroadcastChannel. When the leader goes away its lock passes to another tab, which
//   announces itself; every tab's virtual socket closes (1012) and reconnects to the new hub,
//   resubscribing with `since`: nothing is duplicated, nothing skipped silently.
//
// A dead tab is noticed without its help: each tab holds a Web Lock of its own for its whole
// life, and the hub asks for that lock, which it gets when the tab is gone. A dead SharedWorker
// is noticed the same way, by the tabs, through the lock the worker holds.
//
// Sharing is keyed by the broker URL and the token's `sub` (or, for a token that is not a JWT,
// a hash of the token): tabs of different users never share a connection or a token. The hub
// connects with the token of the tab whose virtual socket opened it; every tab refreshes its
// own token (the `auth` goes up the shared connection, and the new `welcome` reaches all tabs).

import { SUBPROTOCOL, isPattern, topicMatches } from "./client.js";

const PREFIX = "pubsub-shared";

function randomId() {
  return Math.random().toString(36).slice(2) + Date.now().toString(36);
}

// -- the sharing key ------------------------------------------------------------------------

function base64UrlDecode(text) {
  const b64 = text.replace(/-/g, "+").replace(/_/g, "/");
  return atob(b64 + "=".repeat((4 - (b64.length % 4)) % 4));
}

/** Who a token speaks for: `sub:<sub>` for a JWT, `hash:<sha-256>` for any other token,
 * `anonymous` for none. The claims are read, not verified: the broker verifies them. */
export async function tokenIdentity(token) {
  if (!token) return "anonymous";
  const parts = String(token).split(".");
  if (parts.length === 3) {
    try {
      const claims = JSON.parse(base64UrlDecode(parts[1]));
      if (claims && typeof claims.sub === "string") return `sub:${claims.sub}`;
    } catch (_) {
      // not a JWT after all: hashed below
    }
  }
  const digest = await crypto.subtle.digest("SHA-256", new TextEncoder().encode(String(token)));
  return `hash:${[...new Uint8Array(digest)].map((b) => b.toString(16).padStart(2, "0")).join("")}`;
}

// -- the hub: one upstream WebSocket, many virtual connections --------------------------------

/**
 * Multiplexes virtual connections (one per tab client) over one WebSocket. Links carry the
 * messages: `link.send(msg)` posts to a tab; the host calls `receive(link, msg)` with what the
 * tab posted and `linkGone(link)` when the tab is gone. Messages: `open` {conn, url, token,
 * tokenIn}, `frame` {conn, data}, `close` {conn, code, reason} both ways, `opened` {conn} down.
 */
export class Hub {
  constructor(WebSocketClass = globalThis.WebSocket) {
    this.WebSocket = WebSocketClass;
    this.conns = new Map(); // "<link id>/<conn>" -> {link, conn, subs: Map(topic -> presence)}
    this.ws = null;
    this.welcome = null; // the last upstream welcome frame (text)
    this.topics = new Map(); // topic -> {presence, epoch, offset, reply, live: Set(conn)}
    this.chains = new Map(); // topic -> promise: subscription changes run one at a time
    this.pending = new Map(); // upstream id -> callback(frame)
    this.nextId = 1;
  }

  receive(link, msg) {
    const key = `${link.id}/${msg.conn}`;
    if (msg.type === "open") this._openConn(key, link, msg);
    else if (msg.type === "close") this._closeConn(key, msg.code);
    else if (msg.type === "frame") {
      const conn = this.conns.get(key);
      if (conn) this._fromTab(conn, msg.data);
    }
  }

  /** The tab behind `link` is gone: forget its connections and their subscriptions. */
  linkGone(link) {
    for (const [key, conn] of this.conns) if (conn.link === link) this._closeConn(key, 1001);
  }

  // connections

  _openConn(key, link, msg) {
    const conn = { key, link, conn: msg.conn, subs: new Map(), welcomed: false };
    this.conns.set(key, conn);
    link.send({ type: "opened", conn: msg.conn });
    if (!this.ws) this._connect(msg);
    else if (this.welcome) this._welcome(conn);
  }

  _closeConn(key, code) {
    const conn = this.conns.get(key);
    if (!conn) return;
    this.conns.delete(key);
    for (const topic of conn.subs.keys()) this._release(topic);
    // A tab that gave up on the connection (no answer to its ping) speaks for all of them.
    if (code === 4000 && this.ws) this._dropUpstream(1006, "a tab found the connection dead");
    else if (this.conns.size === 0 && this.ws) this._dropUpstream(1000, "no tab left");
  }

  _welcome(conn) {
    conn.welcomed = true;
    this._toTab(conn, this.welcome);
  }

  _toTab(conn, data) {
    conn.link.send({ type: "frame", conn: conn.conn, data });
  }

  // the upstream WebSocket

  _connect({ url, token, tokenIn }) {
    let target = url;
    if (token && tokenIn !== "frame") {
      const u = new URL(url);
      u.searchParams.set("token", token);
      target = u.toString();
    }
    let ws;
    try {
      ws = new this.WebSocket(target, [SUBPROTOCOL]);
    } catch (err) {
      this._closeAll(1006, String(err));
      return;
    }
    this.ws = ws;
    ws.onopen = () => {
      if (token && tokenIn === "frame") ws.send(JSON.stringify({ op: "auth", token }));
    };
    ws.onmessage = (event) => {
      if (ws === this.ws) this._fromUpstream(event.data);
    };
    ws.onclose = (event) => {
      if (ws === this.ws) this._upstreamClosed(event.code, event.reason);
    };
  }

  _dropUpstream(code, reason) {
    const ws = this.ws;
    if (!ws) return;
    try {
      ws.close(code === 1006 ? 4000 : code, reason);
    } catch (_) {
      // already closing
    }
    this._upstreamClosed(code, reason);
  }

  _upstreamClosed(code, reason) {
    const ws = this.ws;
    if (ws) ws.onopen = ws.onmessage = ws.onclose = null;
    this.ws = null;
    this.welcome = null;
    this.topics.clear();
    this.chains.clear();
    const pending = [...this.pending.values()];
    this.pending.clear();
    for (const callback of pending) callback(null);
    this._closeAll(code, reason);
  }

  /** Close every virtual connection like the real one closed: each tab reconnects by itself. */
  _closeAll(code, reason) {
    const conns = [...this.conns.values()];
    this.conns.clear();
    for (const conn of conns) conn.link.send({ type: "close", conn: conn.conn, code, reason });
  }

  _request(frame, callback) {
    const id = this.nextId++;
    this.pending.set(id, callback);
    this.ws.send(JSON.stringify({ ...frame, id }));
  }

  /** `_request` as a promise; rejects with the error reply (or null: the connection closed). */
  _ask(frame) {
    return new Promise((resolve, reject) => {
      this._request(frame, (reply) => (reply && reply.ok ? resolve(reply) : reject(reply)));
    });
  }

  _fromUpstream(raw) {
    let frame;
    try {
      frame = JSON.parse(raw);
    } catch (_) {
      return;
    }
    if (frame === null || typeof frame !== "object") return;
    if (frame.id !== undefined && frame.id !== null && "ok" in frame) {
      const callback = this.pending.get(frame.id);
      this.pending.delete(frame.id);
      if (callback) callback(frame);
      return;
    }
    if (frame.op === "welcome") {
      this.welcome = raw;
      for (const conn of this.conns.values()) this._welcome(conn);
    } else if (frame.op === "message") {
      const entry = this.topics.get(frame.topic);
      if (entry && entry.epoch === frame.epoch && frame.offset > entry.offset) {
        entry.offset = frame.offset;
      } else if (entry && entry.epoch !== frame.epoch) {
        entry.epoch = frame.epoch;
        entry.offset = frame.offset;
      }
      for (const conn of this.conns.values()) {
        for (const topic of conn.subs.keys()) {
          if (topic === frame.topic || topicMatches(topic, frame.topic)) {
            this._deliver(conn, topic, frame, raw);
            break;
          }
        }
      }
    } else if (frame.op === "join" || frame.op === "leave") {
      for (const conn of this.conns.values()) {
        if (conn.subs.has(frame.topic)) this._toTab(conn, raw);
      }
    } else {
      for (const conn of this.conns.values()) this._toTab(conn, raw);
    }
  }

  _deliver(conn, topic, frame, raw) {
    // A tab catching up from history gets what arrives live meanwhile after its history.
    const queue = conn.catchingUp?.get(frame.topic);
    if (queue) queue.push(raw);
    else this._toTab(conn, raw);
  }

  // requests from the tabs

  _fromTab(conn, raw) {
    let frame;
    try {
      frame = JSON.parse(raw);
    } catch (_) {
      return;
    }
    if (!this.ws || !this.welcome) return; // a tab sends nothing before its welcome
    const id = frame.id;
    const reply = (answer) => this._toTab(conn, JSON.stringify({ ...answer, id }));
    if (frame.op === "subscribe" && typeof frame.topic === "string") {
      this._chain(frame.topic, () => this._subscribe(conn, frame, reply));
    } else if (frame.op === "unsubscribe") {
      // never upstream directly: other tabs may hold the topic
      if (!conn.subs.delete(frame.topic)) {
        reply({ ok: false, error: { code: "not_subscribed", message: frame.topic } });
        return;
      }
      reply({ ok: true, topic: frame.topic });
      this._release(frame.topic);
    } else {
      const { id: _id, ...rest } = frame;
      this._request(rest, (answer) => {
        if (answer && frame.op === "auth" && answer.ok) this._refreshed(conn, answer);
        if (answer && this.conns.get(conn.key) === conn) reply(answer);
      });
    }
  }

  /** A tab refreshed the token: the broker sends no new welcome, so the hub tells the other
   * tabs the new expiry with one (a welcome on a live connection only updates the client). */
  _refreshed(from, answer) {
    const welcome = { ...JSON.parse(this.welcome), expires_at: answer.expires_at ?? null };
    this.welcome = JSON.stringify(welcome);
    for (const conn of this.conns.values()) if (conn !== from) this._toTab(conn, this.welcome);
  }

  /** Run `step` (returning a promise) after the previous subscription change of `topic`. */
  _chain(topic, step) {
    const ws = this.ws;
    const next = (this.chains.get(topic) || Promise.resolve()).then(() => {
      if (ws === this.ws) return step();
      return undefined;
    });
    const tail = next.catch(() => {});
    this.chains.set(topic, tail);
    tail.then(() => {
      if (this.chains.get(topic) === tail) this.chains.delete(topic);
    });
  }

  async _subscribe(conn, frame, reply) {
    const topic = frame.topic;
    const alive = () => this.conns.get(conn.key) === conn;
    if (!alive()) return;
    if (conn.subs.has(topic)) {
      reply({ ok: false, error: { code: "bad_request", message: `already subscribed to ${topic}` } });
      return;
    }
    const presence = frame.presence === true;
    let entry = this.topics.get(topic);
    try {
      if (entry && presence && !entry.presence) {
        // the topic is held without presence: take it again with presence, from where it is
        await this._ask({ op: "unsubscribe", topic });
        this.topics.delete(topic);
        const since = { offset: entry.offset, epoch: entry.epoch };
        entry = await this._hold(topic, { since, presence: true });
      }
      if (!entry) {
        entry = await this._hold(topic, { since: frame.since, presence });
        const { id: _id, ...answer } = entry.reply;
        if (!alive()) return this._release(topic);
        conn.subs.set(topic, presence);
        reply(answer); // the replay, if any, follows from upstream
        return;
      }
      if (!frame.since || entry.wildcard) {
        conn.subs.set(topic, presence);
        const { id: _id, ...answer } = entry.reply;
        reply(entry.wildcard ? answer : { ...answer, offset: entry.offset, epoch: entry.epoch });
        return;
      }
      await this._catchUp(conn, topic, frame.since, presence, reply);
    } catch (err) {
      if (err && alive()) reply(err);
    }
    return undefined;
  }

  /** Subscribe upstream; resolves with the topic's entry. */
  async _hold(topic, { since, presence }) {
    const frame = { op: "subscribe", topic };
    if (since) frame.since = since;
    if (presence) frame.presence = true;
    const reply = await this._ask(frame);
    const entry = {
      wildcard: isPattern(topic),
      presence,
      epoch: reply.epoch,
      offset: reply.offset,
      reply: { ok: true, topic, offset: reply.offset, epoch: reply.epoch },
    };
    if (reply.recovered !== undefined) entry.reply.recovered = reply.recovered;
    if (reply.missed) entry.reply.missed = reply.missed;
    for (const [k, v] of Object.entries(reply)) if (!(k in entry.reply) && k !== "id") entry.reply[k] = v;
    this.topics.set(topic, entry);
    return entry;
  }

  /** A tab resumes a topic the hub already holds: its missed messages come from `history`,
   * then what arrived live meanwhile (the tab drops offsets it already has). */
  async _catchUp(conn, topic, since, presence, reply) {
    const queue = [];
    if (!conn.catchingUp) conn.catchingUp = new Map();
    conn.catchingUp.set(topic, queue);
    conn.subs.set(topic, presence);
    try {
      let first = null;
      const replayed = [];
      let position = since;
      for (;;) {
        const page = await this._ask({ op: "history", topic, since: position, limit: 1000 });
        if (!first) first = page;
        replayed.push(...page.messages);
        const last = page.messages[page.messages.length - 1];
        if (!last || last.offset >= page.offset) break;
        position = { offset: last.offset, epoch: last.epoch };
      }
      if (this.conns.get(conn.key) !== conn) return;
      const answer = { ok: true, topic, offset: first.offset, epoch: first.epoch };
      answer.recovered = first.recovered;
      if (first.missed) answer.missed = first.missed;
      reply(answer);
      for (const m of replayed) this._toTab(conn, JSON.stringify(m));
    } catch (err) {
      conn.subs.delete(topic);
      this._release(topic);
      throw err;
    } finally {
      conn.catchingUp.delete(topic);
    }
    for (const raw of queue) this._toTab(conn, raw);
  }

  /** A tab left `topic`: unsubscribe upstream when no tab holds it any more. */
  _release(topic) {
    for (const conn of this.conns.values()) if (conn.subs.has(topic)) return;
    this._chain(topic, async () => {
      for (const conn of this.conns.values()) if (conn.subs.has(topic)) return;
      if (!this.topics.delete(topic)) return;
      await this._ask({ op: "unsubscribe", topic }).catch(() => {});
    });
  }
}

// -- the tab side: virtual sockets and the way to their hub -----------------------------------

const CONNECTING = 0;
const OPEN = 1;
const CLOSED = 3;

/** What PubSubClient uses as its WebSocket in shared mode: it opens a virtual connection on
 * the hub that serves this URL and user. */
class VirtualSocket {
  constructor(channel, url, token) {
    this.channel = channel;
    this.url = url;
    this.token = token;
    this.conn = randomId();
    this.readyState = CONNECTING;
    this.protocol = SUBPROTOCOL;
    this.onopen = this.onmessage = this.onerror = this.onclose = null;
    channel.attach(this);
  }

  send(data) {
    if (this.readyState !== OPEN) throw new Error("the shared connection is not open");
    this.channel.post({ type: "frame", conn: this.conn, data });
  }

  close(code = 1000, reason = "") {
    if (this.readyState === CLOSED) return;
    this.channel.post({ type: "close", conn: this.conn, code, reason });
    this._closed(code, reason);
  }

  _opened() {
    if (this.readyState !== CONNECTING) return;
    this.readyState = OPEN;
    if (this.onopen) this.onopen({});
  }

  _frame(data) {
    if (this.readyState === OPEN && this.onmessage) this.onmessage({ data });
  }

  _closed(code, reason) {
    if (this.readyState === CLOSED) return;
    this.readyState = CLOSED;
    this.channel.detach(this);
    if (this.onclose) this.onclose({ code, reason: reason || "", wasClean: code === 1000 });
  }
}

/**
 * One tab's way to the hub of one sharing key. Subclasses say how messages travel (`_post`)
 * and call `_dispatch(msg)` with what the hub sent to this tab and `_hubChanged()` when the
 * hub went away.
 */
class Channel {
  constructor(key, tokenIn) {
    this.key = key;
    this.tokenIn = tokenIn;
    this.tabId = randomId();
    this.sockets = new Map();
    this.hub = null; // the id of the hub that the sockets are open on
    // Held for this tab's whole life: the hub learns the tab is gone when it gets this lock.
    this.ready = new Promise((resolve) => {
      navigator.locks.request(this.tabLock(this.tabId), () => {
        resolve();
        return new Promise(() => {});
      });
    });
  }

  tabLock(tabId) {
    return `${PREFIX}:tab:${this.key}:${tabId}`;
  }

  attach(socket) {
    this.sockets.set(socket.conn, socket);
    this._sendOpen(socket);
  }

  detach(socket) {
    this.sockets.delete(socket.conn);
  }

  _sendOpen(socket) {
    if (this.hub === null) return; // sent when a hub announces itself
    socket.hub = this.hub;
    this.post({
      type: "open",
      conn: socket.conn,
      url: socket.url,
      token: socket.token,
      tokenIn: this.tokenIn,
    });
  }

  /** A (new) hub announced itself: sockets open on another hub close, waiting ones open. */
  _hubIs(hubId) {
    if (hubId === this.hub) return;
    this.hub = hubId;
    for (const socket of [...this.sockets.values()]) {
      if (socket.hub === undefined) this._sendOpen(socket);
      else socket._closed(1012, "the shared connection moved");
    }
  }

  _hubGone() {
    this.hub = null;
    for (const socket of [...this.sockets.values()]) {
      socket._closed(1012, "the shared connection went away");
    }
  }

  _dispatch(msg) {
    const socket = this.sockets.get(msg.conn);
    if (!socket) return;
    if (msg.type === "opened") socket._opened();
    else if (msg.type === "frame") socket._frame(msg.data);
    else if (msg.type === "close") socket._closed(msg.code, msg.reason);
  }
}

/** The hub is a SharedWorker, one per key; the tab notices its death through its lock. */
class WorkerChannel extends Channel {
  constructor(key, tokenIn, workerUrl) {
    super(key, tokenIn);
    this.workerUrl = workerUrl;
    this._start();
  }

  _start() {
    const worker = new SharedWorker(this.workerUrl, { type: "module", name: `${PREFIX}:${this.key}` });
    this.port = worker.port;
    this.port.onmessage = (event) => {
      const msg = event.data;
      if (msg.type === "hello") this._watch(msg.hub, msg.lock);
      else this._dispatch(msg);
    };
    this.port.start();
    this.ready.then(() => this.port.postMessage({ type: "hello", tab: this.tabId, key: this.key }));
  }

  _watch(hubId, lock) {
    const port = this.port;
    this._hubIs(hubId);
    // Granted only once the worker holding it is gone (killed, crashed): start another.
    navigator.locks.request(lock, () => {
      if (this.port !== port) return;
      port.onmessage = null;
      this._hubGone();
      this._start();
    });
  }

  post(msg) {
    this.port.postMessage(msg);
  }
}

/** The hub is the tab holding the leader lock; the others talk to it over a BroadcastChannel. */
class LeaderChannel extends Channel {
  constructor(key, tokenIn) {
    super(key, tokenIn);
    this.bc = new BroadcastChannel(`${PREFIX}:${key}`);
    this.localHub = null;
    this.links = new Map(); // follower tab id -> link (on the leader)
    this.bc.onmessage = (event) => this._onBroadcast(event.data);
    this.ready.then(() => {
      navigator.locks.request(`${PREFIX}:leader:${key}`, () => this._lead());
      this.bc.postMessage({ type: "who" });
    });
  }

  _lead() {
    // The leader's own client reaches the hub through a MessageChannel, not by direct calls:
    // each frame then arrives in a task of its own, as from a WebSocket, so a reply's handlers
    // run before the frames that follow it (the replay after a `subscribe` reply).
    const down = new MessageChannel();
    const up = new MessageChannel();
    down.port2.onmessage = (event) => this._dispatch(event.data);
    this.local = { id: this.tabId, send: (msg) => down.port1.postMessage(msg) };
    up.port2.onmessage = (event) => this.localHub.receive(this.local, event.data);
    this.localUp = up.port1;
    this.localHub = new Hub();
    this._hubIs(this.tabId);
    this.bc.postMessage({ type: "hello", hub: this.tabId });
    return new Promise(() => {}); // lead until this tab goes away
  }

  _onBroadcast(msg) {
    if (msg.type === "hello") this._hubIs(msg.hub);
    else if (msg.type === "who" && this.localHub) {
      this.bc.postMessage({ type: "hello", hub: this.tabId });
    } else if (msg.to === this.tabId) this._dispatch(msg);
    else if (msg.hub === this.tabId && this.localHub) this.localHub.receive(this._link(msg.from), msg);
  }

  _link(tabId) {
    let link = this.links.get(tabId);
    if (!link) {
      link = { id: tabId, send: (msg) => this.bc.postMessage({ ...msg, to: tabId }) };
      this.links.set(tabId, link);
      navigator.locks.request(this.tabLock(tabId), () => {
        this.links.delete(tabId);
        this.localHub.linkGone(link);
      });
    }
    return link;
  }

  post(msg) {
    if (this.localHub) {
      this.localUp.postMessage(msg);
    } else {
      this.bc.postMessage({ ...msg, hub: this.hub, from: this.tabId });
    }
  }
}

const channels = new Map();

/** Which mechanism this page gets: "worker" (a SharedWorker can load the worker script: the
 * page is on the broker's origin), "leader" (Web Locks and BroadcastChannel), or null. */
export function sharingMechanism(workerUrl, preference = true) {
  const sameOrigin = new URL(workerUrl, location.href).origin === location.origin;
  const worker = typeof SharedWorker === "function" && sameOrigin;
  const leader =
    typeof BroadcastChannel === "function" && typeof navigator !== "undefined" && !!navigator.locks;
  if (preference === "worker") return worker && leader ? "worker" : null;
  if (preference === "leader") return leader ? "leader" : null;
  if (worker && leader) return "worker";
  return leader ? "leader" : null;
}

/**
 * A WebSocket class for PubSubClient that shares one connection per broker URL and user among
 * the tabs: `new (sharedSocket(opts))(url, protocols)` where `url` carries `?token=`. `opts`:
 * workerUrl (of /client-worker.js), mechanism ("worker" or "leader"), tokenIn.
 */
export function sharedSocket({ workerUrl, mechanism, tokenIn }) {
  return class SharedWebSocket {
    constructor(url) {
      const u = new URL(url);
      const token = u.searchParams.get("token");
      u.searchParams.delete("token");
      const base = u.toString();
      const inner = { readyState: CONNECTING, buffer: [] };
      this._inner = inner;
      this.readyState = CONNECTING;
      this.onopen = this.onmessage = this.onerror = this.onclose = null;
      tokenIdentity(token).then(
        (who) => {
          if (inner.closed) return;
          const key = `${base}|${who}|${tokenIn}`;
          let channel = channels.get(key);
          if (!channel) {
            channel =
              mechanism === "worker"
                ? new WorkerChannel(key, tokenIn, workerUrl)
                : new LeaderChannel(key, tokenIn);
            channels.set(key, channel);
          }
          channel.ready.then(() => {
            if (inner.closed) return;
            const socket = new VirtualSocket(channel, base, token);
            inner.socket = socket;
            socket.onopen = (e) => {
              this.readyState = OPEN;
              if (this.onopen) this.onopen(e);
            };
            socket.onmessage = (e) => this.onmessage && this.onmessage(e);
            socket.onclose = (e) => {
              this.readyState = CLOSED;
              if (this.onclose) this.onclose(e);
            };
          });
        },
        (err) => this._fail(String(err)),
      );
    }

    _fail(reason) {
      this._inner.closed = true;
      this.readyState = CLOSED;
      if (this.onclose) this.onclose({ code: 1006, reason, wasClean: false });
    }

    send(data) {
      if (!this._inner.socket) throw new Error("the shared connection is not open");
      this._inner.socket.send(data);
    }

    close(code = 1000, reason = "") {
      this._inner.closed = true;
      this.readyState = CLOSED;
      if (this._inner.socket) this._inner.socket.close(code, reason);
    }
  };
}

// -- the SharedWorker host (see client-worker.js) -----------------------------------------------

/** Serve a hub in this SharedWorker: each connecting tab says hello with its lock name; the
 * worker holds a lock of its own so that the tabs learn when it is gone. */
export function serveSharedWorker(scope) {
  let hub = null;
  let lock = null;
  const held = new Promise((resolve) => {
    lock = `${PREFIX}:worker:${scope.name}:${randomId()}`;
    navigator.locks.request(lock, () => {
      resolve();
      return new Promise(() => {});
    });
  });
  scope.onconnect = (event) => {
    const port = event.ports[0];
    const link = { id: randomId(), send: (msg) => port.postMessage(msg) };
    port.onmessage = (e) => {
      const msg = e.data;
      if (msg.type === "hello") {
        if (!hub) hub = new Hub();
        held.then(() => port.postMessage({ type: "hello", hub: lock, lock }));
        // the tab's own lock is granted to us once the tab is gone
        navigator.locks.request(`${PREFIX}:tab:${msg.key}:${msg.tab}`, () => hub.linkGone(link));
      } else if (hub) hub.receive(link, msg);
    };
    port.start();
  };
}
