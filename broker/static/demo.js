// The demo page: a small UI over the browser client, served at /demo/.
import { PubSubClient, isPattern } from "/client.js";

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);

// What tests and curious developers can read from the console.
const demo = { client: null, messages: [], gaps: [], states: [], errors: [] };
window.pubsubDemo = demo;

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k.startsWith("data-")) node.setAttribute(k, v);
    else node[k] = v;
  }
  for (const c of children) node.append(c);
  return node;
}

function logRow(kind, cells, data = {}) {
  const row = el("tr", { class: kind, ...data });
  for (const c of cells) row.append(el("td", {}, c ?? ""));
  const body = $("log");
  body.prepend(row);
  while (body.rows.length > 500) body.deleteRow(body.rows.length - 1);
}

function now() {
  return new Date().toLocaleTimeString();
}

function note(text) {
  logRow("info", [now(), "", "", "", "", text]);
}

async function defaultWsUrl() {
  if (params.get("ws")) return params.get("ws");
  try {
    const resp = await fetch("/demo/config");
    const cfg = await resp.json();
    return `${cfg.ws_scheme || "ws"}://${location.hostname}:${cfg.ws_port}/ws`;
  } catch (_) {
    return `ws://${location.hostname}:8765/ws`;
  }
}

function setState(state) {
  const badge = $("state");
  badge.textContent = state;
  badge.dataset.state = state;
  const active = state !== "disconnected" && state !== "closed";
  $("connect").disabled = active;
  $("disconnect").disabled = !active;
}

const presenceLists = new Map();

function renderPresence(topic) {
  const item = document.querySelector(`li[data-topic="${CSS.escape(topic)}"] .members`);
  if (!item) return;
  const members = [...(presenceLists.get(topic) || [])].sort();
  item.textContent = members.length ? `present: ${members.join(", ")}` : "present: nobody";
  item.dataset.members = members.join(",");
}

async function refreshPresence(topic) {
  try {
    presenceLists.set(topic, new Set(await demo.client.presence(topic)));
    renderPresence(topic);
  } catch (err) {
    note(`presence ${topic}: ${err.code || ""} ${err.message}`);
  }
}

function connect() {
  if (demo.client) demo.client.close();
  const token = $("token").value.trim();
  const shared = $("shared").checked;
  const client = new PubSubClient($("ws-url").value.trim(), { token: token || null, shared });
  demo.client = client;
  client.on("state", ({ state }) => {
    if (client !== demo.client) return;
    demo.states.push(state);
    setState(state);
  });
  client.on("welcome", (w) => {
    const sharing = client.sharing ? ` · shared (${client.sharing})` : "";
    $("whoami").textContent = `client ${w.client} · node ${w.node} · worker ${w.worker}${sharing}`;
    note(`connected as ${w.client} (worker ${w.worker})`);
    for (const [topic] of presenceLists) refreshPresence(topic);
  });
  client.on("disconnect", ({ code, reason, willReconnect, delayMs }) => {
    note(`disconnected (${code}${reason ? " " + reason : ""})` +
      (willReconnect ? `, reconnecting in ${delayMs} ms` : ""));
  });
  client.on("error", ({ error }) => {
    demo.errors.push(String(error && error.message));
    note(`error: ${error && (error.code || "")} ${error && error.message}`);
  });
  client.connect().catch((err) => note(`connect failed: ${err.message}`));
}

// A publication that matches several of the page's subscriptions (chat.room1 and chat.*)
// reaches each one's onMessage (the client's rule): the page shows it in one row, whose "via"
// cell lists the subscriptions it came through.
const shown = new Map(); // "epoch topic offset" -> its row, for the rows still in the log

function showMessage(m, sub) {
  const key = `${m.epoch} ${m.topic} ${m.offset}`;
  let row = shown.get(key);
  if (!row) {
    demo.messages.push(m);
    logRow("msg", [now(), m.topic, String(m.offset), m.epoch.slice(0, 8), m.from ?? "(http)",
      JSON.stringify(m.data), ""], { "data-topic": m.topic, "data-offset": String(m.offset) });
    row = $("log").rows[0];
    shown.set(key, row);
    if (shown.size > 500) for (const [k, r] of shown) if (!r.isConnected) shown.delete(k);
  }
  const via = row.dataset.via ? row.dataset.via.split(" ") : [];
  if (!via.includes(sub.topic)) via.push(sub.topic);
  row.dataset.via = via.join(" ");
  row.cells[row.cells.length - 1].textContent = via.join(", ");
}

async function subscribe(topic, presence) {
  const client = demo.client;
  if (!client) return note("connect first");
  const onGap = (g) => {
    demo.gaps.push(g);
    let what;
    if (g.possible) what = "possible gap (wildcard subscriptions cannot be resumed)";
    else if (g.epochChanged) {
      what = `history reset (new epoch): what came after offset ${g.previous?.offset} is lost` +
        (g.from !== null ? `, and offsets ${g.from}..${g.to} of the new epoch` : "");
    } else what = `gap: offsets ${g.from}..${g.to} lost`;
    logRow("gap", [now(), g.topic, "", g.epoch ? g.epoch.slice(0, 8) : "", "", what],
      { "data-topic": g.topic });
  };
  const onJoin = ({ topic: t, client: c }) => {
    presenceLists.get(t)?.add(c);
    renderPresence(t);
  };
  const onLeave = ({ topic: t, client: c }) => {
    presenceLists.get(t)?.delete(c);
    renderPresence(t);
  };
  try {
    const sub = await client.subscribe(topic, {
      presence, onMessage: showMessage, onGap, onJoin, onLeave,
    });
    const li = el("li", { "data-topic": topic },
      el("code", {}, topic),
      el("span", { class: "muted" }, isPattern(topic) ? " wildcard" : ` at offset ${sub.offset}`));
    const btn = el("button", { type: "button", class: "small", textContent: "unsubscribe" });
    btn.addEventListener("click", async () => {
      li.remove();
      presenceLists.delete(topic);
      await client.unsubscribe(topic).catch((e) => note(`unsubscribe: ${e.message}`));
    });
    li.append(" ", btn);
    if (presence) {
      li.append(el("div", { class: "members muted" }));
      presenceLists.set(topic, new Set());
      refreshPresence(topic);
    }
    $("subs").append(li);
    note(`subscribed to ${topic}`);
  } catch (err) {
    note(`subscribe ${topic} refused: ${err.code || ""} ${err.message}`);
  }
}

async function publish(topic, text) {
  let data = text;
  try {
    data = JSON.parse(text);
  } catch (_) {
    // plain text: sent as a JSON string
  }
  try {
    const offset = await demo.client.publish(topic, data);
    $("pub-result").textContent = `published at offset ${offset}`;
    $("pub-result").dataset.offset = String(offset);
  } catch (err) {
    $("pub-result").textContent = `refused: ${err.code || ""} ${err.message}`;
  }
}

async function main() {
  const token = params.get("token");
  if (token !== null) {
    // A credential: out of the address bar, the history and anything copied from there.
    const url = new URL(location.href);
    url.searchParams.delete("token");
    history.replaceState(history.state, "", url);
  }
  $("ws-url").value = await defaultWsUrl();
  $("token").value = token || "";
  $("shared").checked = params.get("shared") === "1";
  setState("disconnected");
  $("connect-form").addEventListener("submit", (e) => {
    e.preventDefault();
    connect();
  });
  $("disconnect").addEventListener("click", () => {
    demo.client?.close();
    $("subs").replaceChildren();
    presenceLists.clear();
  });
  $("subscribe-form").addEventListener("submit", (e) => {
    e.preventDefault();
    subscribe($("sub-topic").value.trim(), $("sub-presence").checked);
  });
  $("publish-form").addEventListener("submit", (e) => {
    e.preventDefault();
    if (!demo.client) return note("connect first");
    publish($("pub-topic").value.trim(), $("pub-data").value);
  });
  $("clear-log").addEventListener("click", () => {
    $("log").replaceChildren();
    shown.clear();
  });
  document.body.dataset.ready = "true";
  if ($("token").value) connect(); // opened with ?token=, as `make run` prints the link
}

main();
