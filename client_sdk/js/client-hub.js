// client-hub.js: the hub of the browser client's shared mode (see client-shared.js): one
// upstream WebSocket multiplexed between the virtual connections of many tabs. It runs in the
// SharedWorker (client-worker.js) or in the leader tab. Served by the broker next to client.js.

import { SUBPROTOCOL, isPattern, topicMatches } from "./client.js";

export const PREFIX = "pubsub-shared";

// What the hub keeps of each topic's latest messages, so that tabs resuming after a change of
// holder are answered without a `history` read each (which the broker's read budget charges).
const RECENT_MAX = 1000;
const RECENT_MAX_CHARS = 1 << 20;
const PROBE_TIMEOUT_MS = 10000;

/** A random id (tabs, connections, workers). */
export function randomId() {
  return Math.random().toString(36).slice(2) + Date.now().toString(36);
}

/** The Web Lock a tab holds for its whole life: its hub learns the tab is gone when it gets it. */
export function tabLock(key, tabId) {
  return `${PREFIX}:tab:${key}:${tabId}`;
}

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
    this.topics = new Map(); // topic or pattern held upstream -> its entry (see _hold)
    this.chains = new Map(); // topic -> promise: subscription changes run one at a time
    this.pending = new Map(); // upstream id -> callback(frame)
    this.nextId = 1;
    this.probe = null; // the timer of a ping checking the connection
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
    const conn = { key, link, conn: msg.conn, subs: new Map(), catchingUp: new Map() };
    this.conns.set(key, conn);
    link.send({ type: "opened", conn: msg.conn });
    if (!this.ws) this._connect(msg);
    else if (this.welcome) this._toTab(conn, this.welcome);
  }

  _closeConn(key, code) {
    const conn = this.conns.get(key);
    if (!conn) return;
    this.conns.delete(key);
    for (const topic of conn.subs.keys()) this._release(topic);
    if (this.conns.size === 0 && this.ws) this._dropUpstream(1000, "no tab left");
    else if (code === 4000 && this.ws) this._probe();
  }

  /** A tab gave up on its virtual connection (no answer to a ping or a subscribe in time): the
   * real one may be dead, or the tab merely slow (throttled in the background). Ask the broker;
   * no answer in time drops the connection for every tab. */
  _probe() {
    if (this.probe || !this.welcome) return;
    const ws = this.ws;
    this.probe = setTimeout(() => {
      this.probe = null;
      if (ws === this.ws) this._dropUpstream(1006, "no answer to ping");
    }, PROBE_TIMEOUT_MS);
    this._request({ op: "ping" }, () => {
      clearTimeout(this.probe);
      this.probe = null;
    });
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
    clearTimeout(this.probe);
    this.probe = null;
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
    const all = [...this.conns.values()];
    if (frame.op === "welcome") {
      this.welcome = raw;
      this._fanOut(all, raw);
    } else if (frame.op === "join" || frame.op === "leave") {
      this._fanOut(
        all.filter((conn) => conn.subs.has(frame.topic)),
        raw,
      );
    } else if (typeof frame.topic === "string") {
      // a `message`, or any other push about a topic: to the tabs subscribed to it, in order
      const entry = frame.op === "message" ? this.topics.get(frame.topic) : undefined;
      if (entry) this._remember(entry, frame, raw);
      const targets = [];
      for (const conn of all) {
        if (![...conn.subs.keys()].some((topic) => topicMatches(topic, frame.topic))) continue;
        // A tab catching up from history gets what arrives live meanwhile after its history.
        const queue = conn.catchingUp.get(frame.topic);
        if (queue) queue.push(raw);
        else targets.push(conn);
      }
      this._fanOut(targets, raw);
    } else {
      this._fanOut(all, raw);
    }
  }

  /** Send `data` to these connections: once per link that can multicast (the tabs on a
   * BroadcastChannel each see every message, so one message serves them all), else to each. */
  _fanOut(conns, data) {
    const groups = new Map();
    for (const conn of conns) {
      const multicast = conn.link.multicast;
      if (!multicast) this._toTab(conn, data);
      else if (groups.has(multicast)) groups.get(multicast).push(conn.conn);
      else groups.set(multicast, [conn.conn]);
    }
    for (const [multicast, ids] of groups) multicast({ type: "frame", conns: ids, data });
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
      const message = `already subscribed to ${topic}`;
      reply({ ok: false, error: { code: "bad_request", message } });
      return;
    }
    const presence = frame.presence === true;
    let entry = this.topics.get(topic);
    try {
      if (entry && presence && !entry.presence) {
        // The topic is held without presence: take it again with presence, from where it is
        // (the other tabs drop what is replayed twice). Refused: take it back without.
        await this._ask({ op: "unsubscribe", topic });
        this.topics.delete(topic);
        const since = { offset: entry.offset, epoch: entry.epoch };
        try {
          entry = await this._hold(topic, { since, presence: true });
        } catch (err) {
          await this._hold(topic, { since, presence: false }).catch(() => {});
          throw err;
        }
      }
      if (!entry) {
        entry = await this._hold(topic, { since: frame.since, presence });
        if (!alive()) return this._release(topic);
        conn.subs.set(topic, presence);
        reply(entry.reply); // the replay, if any, follows from upstream
        return;
      }
      if (!frame.since || entry.wildcard) {
        conn.subs.set(topic, presence);
        const { recovered: _r, missed: _m, ...answer } = entry.reply;
        reply(entry.wildcard ? answer : { ...answer, offset: entry.offset, epoch: entry.epoch });
        return;
      }
      if (!this._resumeFromRecent(conn, entry, frame.since, presence, reply)) {
        await this._catchUp(conn, topic, frame.since, presence, reply);
      }
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
    const { id: _id, ...answer } = await this._ask(frame);
    // `reply` answers the tab that asked (with `recovered` and `missed` if it gave `since`), and
    // later tabs, with the hub's position then.
    const entry = {
      topic,
      wildcard: isPattern(topic),
      presence,
      epoch: answer.epoch,
      offset: answer.offset,
      reply: answer,
      recent: [], // the latest messages, contiguous, ending at `offset` once replays are in
      recentBytes: 0,
    };
    this.topics.set(topic, entry);
    return entry;
  }

  /** Keep the topic's position, and its latest messages while they follow one another. */
  _remember(entry, frame, raw) {
    if (entry.epoch !== frame.epoch) {
      entry.epoch = frame.epoch;
      entry.offset = frame.offset;
      entry.recent = [];
      entry.recentBytes = 0;
    } else if (frame.offset > entry.offset) {
      entry.offset = frame.offset;
    }
    const recent = entry.recent;
    const last = recent[recent.length - 1];
    if (last && frame.offset <= last.offset) return; // already kept
    if (last && frame.offset !== last.offset + 1) {
      recent.length = 0; // not contiguous: what is kept must be
      entry.recentBytes = 0;
    }
    recent.push({ offset: frame.offset, raw });
    entry.recentBytes += raw.length;
    while (recent.length > RECENT_MAX || entry.recentBytes > RECENT_MAX_CHARS) {
      entry.recentBytes -= recent.shift().raw.length;
    }
  }

  /** A tab resumes from `since` what the hub kept of the topic: answered at once, without
   * asking the broker (after a change of holder, every tab but the first resumes so). Returns
   * false, doing nothing, when what was kept does not reach back to `since`. */
  _resumeFromRecent(conn, entry, since, presence, reply) {
    if (since.epoch !== entry.epoch || since.offset > entry.offset) return false;
    const recent = entry.recent;
    const covered =
      since.offset === entry.offset ||
      (recent.length > 0 &&
        recent[0].offset <= since.offset + 1 &&
        recent[recent.length - 1].offset === entry.offset);
    if (!covered) return false;
    conn.subs.set(entry.topic, presence);
    const { epoch, offset } = entry;
    reply({ ok: true, topic: entry.topic, offset, epoch, recovered: true });
    for (const m of recent) if (m.offset > since.offset) this._toTab(conn, m.raw);
    return true;
  }

  /** A tab resumes a topic the hub already holds: its missed messages come from `history`,
   * then what arrived live meanwhile (the tab drops offsets it already has). */
  async _catchUp(conn, topic, since, presence, reply) {
    const queue = [];
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
