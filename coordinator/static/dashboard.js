// The zerop2p dashboard. Every EVERY_MS it reads the coordinator's routes with the bearer token
// (typed once, kept in localStorage) and redraws: the status sentence, the workers with what
// each rank is doing (the stalled one highlighted), loss and eval curves, steps over time per
// rank, throughput, learning rate and gradient norm, the peer round-trip matrix, generations
// and outer rounds. The page holds no data of its own; charts.js draws the curves.
"use strict";

const EVERY_MS = 2000;
const TOKEN_KEY = "zerop2p-token";
const FULL = 10000, RECENT = 500;  // telemetry rows read first, then at each poll
const KEEP = 50000;  // telemetry rows the page keeps at most
const PEER = /^peer(\d+)_(rtt_ms|send_mb_s)$/;  // coordinator/models.py PEER_FIELD
const RTT_LOW = 0.2, RTT_HIGH = 200;  // ms: the latency matrix's green and red ends

const $ = id => document.getElementById(id);
const tokenInput = $("token");
tokenInput.value = localStorage.getItem(TOKEN_KEY) || "";

class HttpError extends Error {}

async function get(path) {
  const headers = tokenInput.value ? {Authorization: `Bearer ${tokenInput.value}`} : {};
  let r;
  try {
    r = await fetch(path, {headers, cache: "no-store"});
  } catch (e) {
    throw new HttpError(`coordinator unreachable (${path}): ${e.message}`);
  }
  if (!r.ok) {
    let detail = r.statusText;
    try { detail = (await r.json()).detail; } catch (e) { /* not JSON: keep the status text */ }
    const err = new HttpError(`${path}: ${r.status} ${typeof detail === "string" ? detail
                                                      : JSON.stringify(detail)}`);
    err.status = r.status;
    throw err;
  }
  return r.json();
}

const fmt = (v, digits = 0) => (v == null ? "" : Number(v).toFixed(digits));
const ranksText = rs => `rank${rs.length > 1 ? "s" : ""} ${rs.join(", ")}`;

// -- telemetry, merged across polls: the first poll reads FULL rows, later ones the newest
// RECENT (all of them again when more than that arrived in between) ------------------------
const telemetry = {
  rows: new Map(),
  newest: -Infinity,
  async poll() {
    let rows = await get(`telemetry?limit=${this.rows.size ? RECENT : FULL}`);
    if (this.rows.size && rows.length === RECENT && rows[0].ts > this.newest) {
      rows = await get(`telemetry?limit=${FULL}`);
    }
    for (const r of rows) {
      this.rows.set(`${r.worker_id} ${r.ts}`, r);
      this.newest = Math.max(this.newest, r.ts);
    }
    let all = [...this.rows.values()].sort((a, b) => a.ts - b.ts);
    if (all.length > KEEP) {
      all = all.slice(-KEEP);
      this.rows = new Map(all.map(r => [`${r.worker_id} ${r.ts}`, r]));
    }
    return all;
  },
};

// -- tables ----------------------------------------------------------------------------------
function cell(text, cls) {
  const td = document.createElement("td");
  td.textContent = text ?? "";
  if (cls) td.className = cls;
  return td;
}

function doing(rs) {
  if (!rs || !rs.activity) return "";
  return [rs.activity, rs.unit != null && `unit ${rs.unit}`,
          rs.micro_batch != null && `micro-batch ${rs.micro_batch}`].filter(Boolean).join(" · ");
}

function waitingFor(rs, stalled) {
  if (stalled) {
    const owes = stalled.owes ? `owes ${stalled.owes.what}` : "silent";
    const waiting = stalled.waiting_ranks;
    const who = waiting.length
      ? `; ${ranksText(waiting)} ${waiting.length > 1 ? "wait" : "waits"} on it` : "";
    return `STALLED ${fmt(stalled.silent_s, 1)} s: ${owes}${who}`;
  }
  const w = rs && rs.waiting;
  if (!w) return "";
  const from = w.missing && w.missing.length ? ` from ${ranksText(w.missing)}` : "";
  return `${w.what}${from} for ${fmt(w.seconds, 1)} s`;
}

function drawWorkers(workers, statuses) {
  const ranks = new Map(), stalled = new Map(), leader = new Map();
  for (const st of statuses) {
    for (const rs of st.ranks) ranks.set(rs.worker_id, rs);
    for (const s of st.stalled) stalled.set(s.worker_id, s);
    leader.set(st.site, Math.max(-1, ...st.ranks.map(rs => rs.step ?? -1)));
  }
  const now = Date.now() / 1000;
  const order = w => [w.site, ranks.get(w.worker_id)?.rank ?? 1e9, w.worker_id];
  const rows = [...workers].sort((a, b) => {
    const [x, y] = [order(a), order(b)];
    return byKey(x[0], y[0]) || x[1] - y[1] || byKey(x[2], y[2]);
  });
  const body = document.querySelector("#workers tbody");
  body.replaceChildren(...rows.map(w => {
    const rs = ranks.get(w.worker_id), st = stalled.get(w.worker_id);
    const step = rs?.step ?? w.step, top = leader.get(w.site) ?? -1;
    const behind = step != null && top > step ? ` (${step - top})` : "";
    const heard = rs?.silent_s != null ? rs.silent_s : now - w.last_heartbeat;
    const tr = document.createElement("tr");
    tr.dataset.worker = w.worker_id;
    tr.dataset.site = w.site;
    if (rs) tr.dataset.rank = rs.rank;
    if (st) tr.className = "stalled";
    tr.append(cell(w.worker_id), cell(w.site), cell(rs?.rank), cell(w.status, w.status),
              cell(w.phase), cell(doing(rs)), cell(step == null ? "" : `${step}${behind}`, "num"),
              cell(fmt(w.loss, 4), "num"), cell(fmt(w.tokens_per_s), "num"),
              cell(waitingFor(rs, st), "waiting"), cell(`${fmt(heard, 1)} s ago`, "num"));
    return tr;
  }));
}

function drawStatus(statuses) {
  const banner = $("status");
  const several = statuses.length > 1;
  banner.replaceChildren(...statuses.map(st => {
    const p = document.createElement("p");
    p.textContent = several ? `site ${st.site}: ${st.sentence}` : st.sentence;
    return p;
  }));
  if (!statuses.length) banner.textContent = "no workers have registered yet";
  banner.classList.toggle("stalled", statuses.some(st => st.stalled.length > 0));
}

function drawGenerations(gens) {
  $("generation").textContent = gens.map(g => {
    const where = gens.length > 1 ? `site ${g.site}: ` : "";
    return g.generation == null ? `${where}no active generation (last ${g.last_generation})`
      : `${where}generation ${g.generation}, ${g.workers.length} members`;
  }).join("; ");
}

// 0 (green) at RTT_LOW ms or less to 1 (red) at RTT_HIGH ms or more, on a log scale
const heat = ms => Math.min(1, Math.max(0, Math.log(ms / RTT_LOW) / Math.log(RTT_HIGH / RTT_LOW)));

// rank x peer: the round trip and send rate in each rank's newest row of its generation
function drawLatency(rows, gens, rankOf) {
  const current = new Map(gens.map(g => [g.site, g.generation]));
  const newest = new Map();
  for (const r of rows) {
    const site = rankOf.site(r);
    if (r.metrics.rank == null || r.metrics.generation !== current.get(site)) continue;
    newest.set(rankOf(r), r);  // rows are oldest first
  }
  const keys = [...newest.keys()].sort(byKey);
  const cols = new Set(keys.map(k => newest.get(k).metrics.rank));
  for (const r of newest.values()) {
    for (const f of Object.keys(r.metrics)) { const m = PEER.exec(f); if (m) cols.add(Number(m[1])); }
  }
  const peers = [...cols].sort((a, b) => a - b);
  const head = document.createElement("tr");
  head.append(...["rank \\ peer", ...peers].map(t => {
    const th = document.createElement("th"); th.textContent = t; return th;
  }));
  $("latency").tHead.replaceChildren(head);
  $("latency").tBodies[0].replaceChildren(...keys.map(k => {
    const m = newest.get(k).metrics, tr = document.createElement("tr");
    const th = document.createElement("th");
    th.textContent = k;
    tr.append(th);
    for (const p of peers) {
      const rtt = m[`peer${p}_rtt_ms`], rate = m[`peer${p}_send_mb_s`];
      const td = cell(p === m.rank ? "—" : rtt == null ? "" : fmt(rtt, rtt < 10 ? 2 : 1),
                      p === m.rank ? "self" : "");
      if (rate != null && p !== m.rank) {
        const small = document.createElement("small");
        small.textContent = `${fmt(rate, 1)} MB/s`;
        td.append(small);
      }
      if (rtt != null && p !== m.rank) {
        td.style.background = `hsl(${120 - 120 * heat(rtt)}, 60%, 88%)`;
        td.dataset.rttMs = rtt;
      }
      tr.append(td);
    }
    return tr;
  }));
  $("latency-note").textContent = keys.length
    ? `newest row of each rank; green ${RTT_LOW} ms or less, red ${RTT_HIGH} ms or more`
    : "no per-peer telemetry from the active generation yet";
}

// -- the loop --------------------------------------------------------------------------------
const observed = {};  // site -> [[ts, generation]] as this page's polls saw it

async function refresh() {
  const workers = await get("workers");
  const alive = workers.filter(w => w.status === "alive");
  const sites = [...new Set((alive.length ? alive : workers).map(w => w.site))].sort(byKey);
  const q = s => `site=${encodeURIComponent(s)}`;
  const [statuses, gens, rounds, rows] = await Promise.all([
    Promise.all(sites.map(s => get(`training/status?${q(s)}`))),
    Promise.all(sites.map(s => get(`training/generation?${q(s)}`))),
    get("islands/rounds?limit=1000"), telemetry.poll()]);
  const now = Date.now() / 1000;
  for (const g of gens) {
    const pts = (observed[g.site] ??= []);
    pts.push([now, g.generation]);
    if (pts.length > 5000) pts.shift();
  }
  const siteOf = new Map(workers.map(w => [w.worker_id, w.site]));
  const rankOf = r => (r.metrics.rank == null ? null : sites.length > 1
    ? `${siteOf.get(r.worker_id)} rank ${r.metrics.rank}` : `rank ${r.metrics.rank}`);
  rankOf.site = r => siteOf.get(r.worker_id);
  drawStatus(statuses);
  drawGenerations(gens);
  drawWorkers(workers, statuses);
  drawLatency(rows, gens, rankOf);
  drawCharts(rows, rankOf, observed, rounds);
  $("updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
  $("updated").dataset.count = Number($("updated").dataset.count || 0) + 1;  // redraws so far
}

let timer = null, running = false, paused = false;

function schedule(ms) {
  clearTimeout(timer);
  timer = setTimeout(tick, ms);
}

async function tick() {
  if (running) { schedule(100); return; }
  running = true;
  try {
    await refresh();
    $("error").textContent = "";
  } catch (e) {
    if (!(e instanceof HttpError)) {  // a bug in this page: say so, and let the console see it
      $("error").textContent = `dashboard error: ${e.message}`;
      throw e;
    }
    const auth = e.status === 401 || e.status === 403;
    $("error").textContent = auth
      ? `${e.message}: enter the coordinator's token (the admin token in TLS mode) and press use`
      : e.message;
    if (auth) { paused = true; tokenInput.focus(); }  // no point asking again with it
  } finally {
    running = false;
    if (!paused) schedule(EVERY_MS);
  }
}

$("login").addEventListener("submit", e => {
  e.preventDefault();
  localStorage.setItem(TOKEN_KEY, tokenInput.value);
  paused = false;
  schedule(0);
});
window.addEventListener("resize", () => { if (!paused) schedule(50); });
schedule(0);
