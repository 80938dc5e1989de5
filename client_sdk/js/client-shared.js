// client-shared.js: one WebSocket for all the tabs of an origin (the `shared` option of
// /client.js). Served by the broker next to /client.js, which imports it only in that mode.
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
//   position), and with `since` its missed messages from the latest ones the hub kept (up to
//   1000 per topic), or else from a `history` read, queued before what arrives live meanwhile;
//   so each tab resumes exactly, as it would on its own socket;
// - the `welcome` and errors not tied to a request go to every tab; after a tab refreshed the
//   token in-band, the other tabs get a `welcome` with the new expiry;
// - when the real WebSocket closes, every virtual socket closes with the same code and reason,
//   and each tab reconnects and resubscribes with `since` as usual; a tab that drops its
//   virtual socket for silence makes the hub ping the broker, not drop the real one at once.
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
// own token (the `auth` goes up the shared connection, and the hub tells the other tabs the
// new expiry).
//
// This module is the tab side; the hub is client-hub.js and the SharedWorker client-worker.js.

import { Hub, PREFIX, randomId, tabLock } from "./client-hub.js";
import { SUBPROTOCOL } from "./client.js";

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
// -- the tab side: virtual sockets and the way to their hub -----------------------------------

const CONNECTING = 0;
const OPEN = 1;
const CLOSED = 3;
// How long a SharedWorker may take to say hello before this page does without one: a worker
// whose script does not load fires `error`, but not in every tab that asked for it when several
// ask at once (seen in Chromium), and such a tab would otherwise wait for ever.
const WORKER_HELLO_MS = 10000;

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
 * One tab's way to the hub of one sharing key. Subclasses say how messages travel (`post`),
 * and call `_dispatch(msg)` with what the hub sent to this tab, `_hubIs(id)` when a hub
 * announces itself and `_hubGone()` when the hub went away.
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
      navigator.locks.request(tabLock(key, this.tabId), () => {
        resolve();
        return new Promise(() => {});
      });
    });
  }

  attach(socket) {
    if (this.failed) {
      queueMicrotask(() => socket._closed(1012, "the shared connection could not start"));
      return;
    }
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
    if (msg.conns) {
      for (const conn of msg.conns) this._dispatch({ ...msg, conns: undefined, conn });
      return;
    }
    const socket = this.sockets.get(msg.conn);
    if (!socket) return;
    if (msg.type === "opened") socket._opened();
    else if (msg.type === "frame") socket._frame(msg.data);
    else if (msg.type === "close") socket._closed(msg.code, msg.reason);
  }
}

/** The hub is a SharedWorker, one per key; the tab notices its death through its lock. */
class WorkerChannel extends Channel {
  /** `onFail()` is called (once, later) if the worker cannot start. */
  constructor(key, tokenIn, workerUrl, onFail) {
    super(key, tokenIn);
    this.workerUrl = workerUrl;
    this.onFail = onFail;
    this.failed = false;
    this._start();
  }

  _fail() {
    if (this.failed) return;
    this.failed = true;
    queueMicrotask(() => {
      this.onFail();
      this._hubGone();
    });
  }

  _start() {
    let worker;
    try {
      const name = `${PREFIX}:${this.key}`;
      worker = new SharedWorker(this.workerUrl, { type: "module", name });
    } catch (_) {
      this._fail(); // a Content Security Policy without worker-src for it, for example
      return;
    }
    // The script did not load or run (before the worker said hello): no worker for this page.
    worker.onerror = () => {
      if (this.hub === null) this._fail();
    };
    const port = (this.port = worker.port);
    const deadline = setTimeout(() => {
      if (this.hub === null && this.port === port) this._fail();
    }, WORKER_HELLO_MS);
    port.onmessage = (event) => {
      if (this.failed) return; // this page went on without a worker
      const msg = event.data;
      if (msg.type === "hello") {
        clearTimeout(deadline);
        this._watch(msg.hub, msg.lock);
      } else this._dispatch(msg);
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
    // One message reaches every follower: a frame for many tabs is posted once (Hub._fanOut).
    this.multicast = (msg) => this.bc.postMessage({ ...msg, to: "*" });
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
    } else if (msg.to === this.tabId || (msg.to === "*" && !this.localHub)) this._dispatch(msg);
    else if (msg.hub === this.tabId && this.localHub) {
      this.localHub.receive(this._link(msg.from), msg);
    }
  }

  _link(tabId) {
    let link = this.links.get(tabId);
    if (!link) {
      link = {
        id: tabId,
        send: (msg) => this.bc.postMessage({ ...msg, to: tabId }),
        multicast: this.multicast,
      };
      this.links.set(tabId, link);
      navigator.locks.request(tabLock(this.key, tabId), () => {
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

const channels = new Map(); // sharing key -> Channel

function channelFor(key, mechanism, tokenIn, workerUrl) {
  let channel = channels.get(key);
  if (!channel) {
    if (mechanism === "worker") {
      // A worker that cannot start: this tab (and the next ones) elect a leader instead.
      const fallBack = () => channels.set(key, new LeaderChannel(key, tokenIn));
      channel = new WorkerChannel(key, tokenIn, workerUrl, fallBack);
    } else {
      channel = new LeaderChannel(key, tokenIn);
    }
    channels.set(key, channel);
  }
  return channel;
}

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
 * workerUrl (of /client-worker.js), mechanism ("worker" or "leader"), tokenIn, and
 * onChannel(mechanism), told at each connection which mechanism serves it (a worker that could
 * not start gives way to a leader tab).
 */
export function sharedSocket({ workerUrl, mechanism, tokenIn, onChannel }) {
  return class SharedWebSocket {
    constructor(url) {
      const u = new URL(url);
      const token = u.searchParams.get("token");
      u.searchParams.delete("token");
      const base = u.toString();
      const inner = { closed: false, socket: null }; // the virtual socket, once the hub is known
      this._inner = inner;
      this.readyState = CONNECTING;
      this.onopen = this.onmessage = this.onerror = this.onclose = null;
      tokenIdentity(token).then(
        (who) => {
          if (inner.closed) return;
          const key = `${base}|${who}|${tokenIn}`;
          const channel = channelFor(key, mechanism, tokenIn, workerUrl);
          if (onChannel) onChannel(channel instanceof WorkerChannel ? "worker" : "leader");
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
