// The operators' page: polls /status/data and draws, per worker, small charts of connections,
// subscriptions, topics and message rates (inline SVG, no libraries).

const POLL_MS = 1000;
const POINTS = 120; // two minutes at one poll a second
const SERIES = [
  { key: "connections", title: "connections" },
  { key: "subscriptions", title: "subscriptions" },
  {
    key: "topics",
    title: "subscribed topics",
    // The worker's count of its subscription index: patterns are subscriptions, not topics.
    hint: "exact topics with at least one subscriber; patterns (chat.*) not counted",
    allHint: "summed over workers: a topic subscribed on two counts twice",
  },
  { key: "publications_in", title: "publications in /s", rate: true },
  { key: "deliveries_out", title: "deliveries out /s", rate: true },
];
const SVG = "http://www.w3.org/2000/svg";

const history = new Map(); // worker -> {key -> [values]}
let previous = null; // the last poll: {time, rows by worker}

function fmt(v) {
  if (v >= 1e6) return (v / 1e6).toFixed(1) + "M";
  if (v >= 1e4) return (v / 1e3).toFixed(1) + "k";
  return Number.isInteger(v) ? String(v) : v.toFixed(1);
}

function chart(card, key, title, hint) {
  let box = card.querySelector(`.chart[data-key="${key}"]`);
  if (!box) {
    box = document.createElement("div");
    box.className = "chart";
    box.dataset.key = key;
    const head = document.createElement("div");
    head.className = "title";
    head.textContent = title;
    const value = document.createElement("div");
    value.className = "value";
    const svg = document.createElementNS(SVG, "svg");
    svg.setAttribute("viewBox", `0 0 ${POINTS - 1} 100`);
    svg.setAttribute("preserveAspectRatio", "none");
    svg.append(document.createElementNS(SVG, "polygon"), document.createElementNS(SVG, "polyline"));
    box.append(head, value, svg);
    if (hint) {
      const note = document.createElement("div");
      note.className = "hint";
      note.textContent = hint;
      box.append(note);
    }
    card.querySelector(".charts").append(box);
  }
  return box;
}

function draw(box, values) {
  const last = values.length ? values[values.length - 1] : 0;
  box.querySelector(".value").textContent = fmt(last);
  box.dataset.value = String(last);
  const max = Math.max(1, ...values);
  const offset = POINTS - values.length;
  const pts = values.map((v, i) => `${offset + i},${(100 - (v / max) * 96).toFixed(1)}`);
  box.querySelector("polyline").setAttribute("points", pts.join(" "));
  const area = pts.length ? `${offset},100 ${pts.join(" ")} ${POINTS - 1},100` : "";
  box.querySelector("polygon").setAttribute("points", area);
}

function workerCard(worker) {
  const id = `worker-${worker}`;
  let card = document.getElementById(id);
  if (!card) {
    card = document.createElement("section");
    card.className = "card wide";
    card.id = id;
    card.dataset.worker = worker;
    const h = document.createElement("h2");
    h.textContent = worker === "all" ? "all workers" : `worker ${worker}`;
    const charts = document.createElement("div");
    charts.className = "charts";
    card.append(h, charts);
    const main = document.getElementById("workers");
    if (worker === "all") main.prepend(card);
    else main.append(card);
  }
  return card;
}

function push(worker, key, value) {
  if (!history.has(worker)) history.set(worker, {});
  const h = history.get(worker);
  const list = (h[key] ||= []);
  list.push(value);
  if (list.length > POINTS) list.shift();
  return list;
}

function update(data) {
  const rows = new Map(data.workers.map((w) => [String(w.worker), w]));
  const total = { worker: "all" };
  for (const s of SERIES) total[s.key] = data.workers.reduce((a, w) => a + (w[s.key] || 0), 0);
  rows.set("all", total);
  const dt = previous ? Math.max(0.001, data.time - previous.time) : null;
  for (const [worker, row] of rows) {
    const card = workerCard(worker);
    for (const s of SERIES) {
      let value = row[s.key] || 0;
      if (s.rate) {
        const before = previous?.rows.get(worker)?.[s.key];
        value = dt && before !== undefined ? Math.max(0, (value - before) / dt) : 0;
      }
      const hint = worker === "all" && s.allHint ? `${s.hint}; ${s.allHint}` : s.hint;
      draw(chart(card, s.key, s.title, hint), push(worker, s.key, value));
    }
  }
  previous = { time: data.time, rows };
  const ready = document.getElementById("ready");
  ready.dataset.ready = String(Boolean(data.ready));
  ready.textContent = data.ready ? "ready" : "not ready";
  document.getElementById("node").textContent =
    `node ${data.node ?? "?"} · ${data.workers.length} worker(s)`;
  document.getElementById("updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
  document.body.dataset.polls = String(Number(document.body.dataset.polls || 0) + 1);
}

async function poll() {
  try {
    const resp = await fetch("/status/data", { cache: "no-store" });
    if (resp.ok) update(await resp.json());
    else document.getElementById("updated").textContent = `status/data answered ${resp.status}`;
  } catch (err) {
    const ready = document.getElementById("ready");
    ready.dataset.ready = "false";
    ready.textContent = "unreachable";
  }
  setTimeout(poll, POLL_MS);
}

poll();
