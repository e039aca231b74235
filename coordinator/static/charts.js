// Charts of the zerop2p dashboard, drawn with uPlot (uPlot.iife.min.js, loaded before this
// file; MIT, vendored). Defines the globals dashboard.js uses: byKey, Chart and
// drawCharts(rows, rankOf, observed, rounds) with the telemetry rows, oldest first.
"use strict";

const EVAL_FIELDS = ["eval_loss", "eval"];  // telemetry fields plotted as the eval curve
const PALETTE = ["#4a78c2", "#d9534f", "#3d9a50", "#e08a1e", "#8e5bb5", "#2aa5a5", "#b5651d",
                 "#555"];
const byKey = (a, b) => (a < b ? -1 : a > b ? 1 : 0);

// -- charts ----------------------------------------------------------------------------------
class Chart {
  // x: "time" (epoch seconds) or "step"; labels: y-axis label by scale name; tiny: scales whose
  // ticks read as 1.0e-3
  constructor(id, {x = "time", labels = {}, tiny = [], height = 240} = {}) {
    this.el = document.getElementById(id);
    this.x = x;
    this.labels = labels;
    this.tiny = tiny;
    this.height = height;
    this.plot = null;
    this.key = null;
  }

  options(series, width) {
    const scales = [...new Set(series.map(s => s.scale || "y"))];
    return {
      width, height: this.height,
      scales: {x: {time: this.x === "time"}},
      axes: [{label: this.x === "time" ? "" : "step"},
             ...scales.map((scale, i) => ({
               scale, label: this.labels[scale] ?? "", side: i ? 1 : 3, grid: {show: i === 0},
               ...(this.tiny.includes(scale) && {size: 60,
                   values: (u, ticks) => ticks.map(v => v.toExponential(1))})}))],
      series: [{label: this.x},
               ...series.map((s, i) => ({
                 label: s.label, scale: s.scale || "y", width: 1.5, spanGaps: true,
                 stroke: s.color || PALETTE[i % PALETTE.length],
                 paths: s.stepped ? uPlot.paths.stepped({align: 1}) : undefined,
                 points: s.points ? {show: true, size: 7} : {}}))],
    };
  }

  // series: [{label, scale, stepped, points, color}]; tables: one [xs, ys] per series
  draw(series, tables) {
    const data = tables.length ? uPlot.join(tables) : [[]];
    const width = Math.max(this.el.clientWidth, 300);
    const key = JSON.stringify(series);
    if (!this.plot || key !== this.key) {
      if (this.plot) this.plot.destroy();
      this.plot = new uPlot(this.options(series, width), data, this.el);
      this.key = key;
    } else {
      this.plot.setData(data);
      if (width !== this.plot.width) this.plot.setSize({width, height: this.height});
    }
    // what the chart was given, for whoever checks the page (tests/test_dashboard_browser.py)
    this.el.dataset.points = tables.reduce((n, t) => n + t[1].filter(v => v != null).length, 0);
    this.el.dataset.series = series.length;
  }
}

const charts = {
  loss: new Chart("loss", {x: "step", labels: {y: "loss"}}),
  timeline: new Chart("timeline", {labels: {y: "step"}}),
  throughput: new Chart("throughput", {labels: {y: "tokens/s"}}),
  optim: new Chart("optim", {x: "step", labels: {lr: "learning rate", gn: "grad norm"},
                     tiny: ["lr"]}),
  generations: new Chart("generations", {labels: {gen: "generation", round: "outer round"}}),
};

// mean of `field` per step, over the rows of the newest generation that reached that step
function perStep(rows, field) {
  const at = new Map();
  for (const r of rows) {
    const v = r.metrics[field], step = r.metrics.step, gen = r.metrics.generation ?? 0;
    if (v == null || step == null) continue;
    const cur = at.get(step);
    if (!cur || gen > cur.gen) at.set(step, {gen, sum: v, n: 1});
    else if (gen === cur.gen) { cur.sum += v; cur.n += 1; }
  }
  const steps = [...at.keys()].sort((a, b) => a - b);
  return [steps, steps.map(s => at.get(s).sum / at.get(s).n)];
}

// one [ts, values] table per rank (site/rank when there are several sites)
function perRank(rows, field, rankOf) {
  const tables = new Map();
  for (const r of rows) {
    const v = r.metrics[field], key = rankOf(r);
    if (v == null || key == null) continue;
    if (!tables.has(key)) tables.set(key, [[], []]);
    tables.get(key)[0].push(r.ts);
    tables.get(key)[1].push(v);
  }
  const keys = [...tables.keys()].sort(byKey);
  return [keys.map(label => ({label})), keys.map(k => tables.get(k))];
}

function drawCharts(rows, rankOf, observed, rounds) {
  // loss and eval: one pair of curves per site (islands train apart between outer rounds)
  const evalField = EVAL_FIELDS.find(f => rows.some(r => r.metrics[f] != null)) || EVAL_FIELDS[0];
  const bySite = new Map();
  for (const r of rows) {
    const site = rankOf.site(r) ?? "?";
    if (!bySite.has(site)) bySite.set(site, []);
    bySite.get(site).push(r);
  }
  const lossSeries = [], lossTables = [];
  for (const site of [...bySite.keys()].sort(byKey)) {
    const of = bySite.size > 1 ? ` (${site})` : "", evals = perStep(bySite.get(site), evalField);
    lossSeries.push({label: `train loss${of}`},
                    {label: `eval loss${of}${evals[0].length ? "" : ": none reported"}`,
                     points: true});
    lossTables.push(perStep(bySite.get(site), "loss"), evals);
  }
  charts.loss.draw(lossSeries, lossTables);
  charts.timeline.draw(...perRank(rows, "step", rankOf));
  charts.throughput.draw(...perRank(rows, "tokens_per_s", rankOf));
  charts.optim.draw([{label: "lr", scale: "lr"}, {label: "grad norm", scale: "gn"}],
                    [perStep(rows, "lr"), perStep(rows, "grad_norm")]);
  // generations: each site's number as its telemetry and this page's polls saw it
  const seen = new Map(Object.entries(observed).map(([site, pts]) => [site, [...pts]]));
  for (const r of rows) {
    const site = rankOf.site(r);
    if (r.metrics.generation == null || site == null) continue;
    if (!seen.has(site)) seen.set(site, []);
    seen.get(site).push([r.ts, r.metrics.generation]);
  }
  const sites = [...seen.keys()].sort(byKey);
  const series = sites.map(s => ({label: `generation (${s})`, scale: "gen", stepped: true}));
  const tables = sites.map(s => {
    const pts = seen.get(s).sort((a, b) => a[0] - b[0]);
    return [pts.map(p => p[0]), pts.map(p => p[1])];
  });
  if (rounds.length) {
    series.push({label: "outer round decided", scale: "round", points: true});
    tables.push([rounds.map(r => r.decided_at), rounds.map(r => r.round)]);
  }
  charts.generations.draw(series, tables);
}

