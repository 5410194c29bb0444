// The live fleet page: one EventSource (/events), the table re-rendered on each push, one uPlot
// chart of the selected device's p95 per stream against its target. No build step.
"use strict";
let selected = new URLSearchParams(location.search).get("device");
let source = null, plot = null, plotKey = null;

function fmt(v, digits) { return v === null || v === undefined ? "-" : Number(v).toFixed(digits); }
function age(s) {
  if (s === null || s === undefined) return "-";
  return s < 90 ? `${Math.max(0, s).toFixed(0)} s ago` : s < 5400 ? `${(s / 60).toFixed(0)} min ago` : `${(s / 3600).toFixed(1)} h ago`;
}
function cell(tr, col, text, cls) {
  const td = document.createElement("td");
  td.dataset.col = col;
  td.textContent = text;
  if (cls) td.className = cls;
  tr.appendChild(td);
  return td;
}

function renderTable(devices) {
  const body = document.querySelector("#fleet tbody");
  body.replaceChildren();
  if (!devices.length) {
    const tr = document.createElement("tr");
    tr.className = "empty";
    cell(tr, "none", "no devices yet").colSpan = 9;
    body.appendChild(tr);
    return;
  }
  for (const d of devices) {
    const tr = document.createElement("tr");
    tr.dataset.key = d.key;
    tr.className = (d.key === selected ? "selected " : "") + (d.state === "online" ? "" : "stale");
    cell(tr, "device", d.key);
    const st = cell(tr, "state", "");
    const badge = document.createElement("span");
    badge.className = `state ${d.state}`;
    badge.textContent = d.state;
    st.appendChild(badge);
    cell(tr, "model", d.model ? `${d.model} v${d.version} ${d.precision || ""}` : "-");
    const over = d.p95_ms !== null && d.target_ms ? (d.p95_ms > d.target_ms ? "over" : "met") : "";
    cell(tr, "p95", `${fmt(d.p95_ms, 2)} / ${fmt(d.target_ms, 0)}`, over);
    cell(tr, "fps", fmt(d.fps, 1));
    cell(tr, "drops", d.dropped === null ? "-" : String(d.dropped));
    cell(tr, "cpu", fmt(d.cpu_percent, 1));
    cell(tr, "rss", fmt(d.rss_mb, 0));
    cell(tr, "seen", age(d.age_s));
    tr.addEventListener("click", () => select(d.key));
    body.appendChild(tr);
  }
}

function renderRollout(rollout) {
  const el = document.getElementById("rollout");
  el.replaceChildren();
  el.className = rollout.length ? "" : "empty";
  if (!rollout.length) { el.textContent = "-"; return; }
  for (const r of rollout) {
    const s = document.createElement("span");
    s.textContent = `${r.model}: ${r.devices} device${r.devices === 1 ? "" : "s"}`;
    el.appendChild(s);
  }
}

function renderRollouts(rollouts) {
  const el = document.getElementById("rollouts");
  el.replaceChildren();
  el.className = rollouts.length ? "" : "empty";
  if (!rollouts.length) { el.textContent = "none"; return; }
  for (const r of rollouts) {
    const div = document.createElement("div");
    div.dataset.rollout = r.id;
    div.className = r.state === "running" || r.state === "aborting" ? "running" : "";
    const phases = Object.entries(r.phases).map(([p, n]) => `${p} ${n}`).join(", ");
    const gate = r.gate_p95_ms ? `, gate p95 <= ${r.gate_p95_ms} ms` : "";
    div.textContent = `${r.id} (${r.state}): ${r.package} v${r.version} to ${r.devices} devices${gate}: ${phases}`;
    el.appendChild(div);
  }
}

const COLORS = ["#1565c0", "#6a1b9a", "#ef6c00", "#00838f", "#558b2f"];

function renderChart(chart) {
  document.getElementById("chart-device").textContent = chart ? chart.device : "-";
  if (!chart) return;
  const data = [chart.t, ...chart.series.map(s => s.p95_ms)];
  if (chart.target_ms) data.push(chart.t.map(() => chart.target_ms));
  const key = chart.device + "|" + chart.series.map(s => s.stream).join(",") + "|" + !!chart.target_ms;
  if (plot && plotKey === key) { plot.setData(data); return; }
  if (plot) plot.destroy();
  const series = [{}, ...chart.series.map((s, i) => ({ label: `${s.stream} p95 (ms)`, stroke: COLORS[i % COLORS.length], width: 2, spanGaps: true }))];
  if (chart.target_ms) series.push({ label: "target (ms)", stroke: "#c62828", dash: [8, 6], width: 2 });
  plot = new uPlot({ width: Math.min(960, window.innerWidth - 40), height: 280, series,
                     scales: { y: { range: (u, lo, hi) => [0, Math.max(hi, chart.target_ms || 0) * 1.15 || 1] } },
                     axes: [{}, { label: "ms" }] }, data, document.getElementById("chart"));
  plotKey = key;
}

function connect() {
  if (source) source.close();
  source = new EventSource("/events" + (selected ? `?device=${encodeURIComponent(selected)}` : ""));
  source.addEventListener("open", () => { document.getElementById("conn").textContent = "live"; });
  source.addEventListener("error", () => { document.getElementById("conn").textContent = "reconnecting…"; });
  source.addEventListener("fleet", ev => {
    const view = JSON.parse(ev.data);
    if (!selected && view.chart) selected = view.chart.device;
    renderTable(view.devices);
    renderRollout(view.rollout);
    renderRollouts(view.rollouts || []);
    renderChart(view.chart);
    document.body.dataset.updates = String(Number(document.body.dataset.updates || 0) + 1);
  });
}

function select(key) {
  selected = key;
  history.replaceState(null, "", `?device=${encodeURIComponent(key)}`);
  connect();
}

connect();
