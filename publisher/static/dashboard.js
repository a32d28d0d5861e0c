// The fleetbus dashboard: polls the JSON API every 2 s and redraws. No library, nothing from outside
// this server: the charts are plain SVG drawn below.
"use strict";

const POLL_MS = 2000;
const SERIES_WINDOW_S = 3600;
const MAX_LINES = 7; // fleet + six groups; more lines than that stop being readable
const MAX_ROWS = 200; // per group: a page redrawn every 2 s stays quick with a large fleet
const COLORS = ["#17212b", "#2f74c0", "#e07b24", "#2e9e5b", "#8a63c7", "#d64545", "#1b9aaa"];
const SVG = "http://www.w3.org/2000/svg";

// --- tiny DOM helpers (text always goes in as textContent, never as markup) -----------------------

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  setAttrs(el, attrs);
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

function s(tag, attrs) {
  const el = document.createElementNS(SVG, tag);
  setAttrs(el, attrs);
  return el;
}

function setAttrs(el, attrs) {
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "text") el.textContent = String(value);
    // Through the CSSOM: the page's CSP refuses inline style attributes, not this.
    else if (key === "style") el.style.cssText = String(value);
    else el.setAttribute(key, String(value));
  }
}

function replace(id, ...children) {
  const el = document.getElementById(id);
  el.replaceChildren(...children.flat());
  return el;
}

function slug(text) {
  return String(text || "").toLowerCase().replace(/[^a-z0-9_]+/g, "_");
}

// --- formatting ------------------------------------------------------------------------------------

function ago(ts) {
  if (ts === null || ts === undefined) return "never";
  const s = Math.max(0, Date.now() / 1000 - ts);
  if (s < 60) return `${Math.round(s)} s ago`;
  if (s < 3600) return `${Math.round(s / 60)} min ago`;
  if (s < 86400) return `${Math.round(s / 3600)} h ago`;
  return `${Math.round(s / 86400)} d ago`;
}

function fmtNum(n) {
  if (n === null || n === undefined) return "–";
  if (Math.abs(n) >= 1e6) return `${(n / 1e6).toFixed(1)}M`;
  if (Math.abs(n) >= 1e4) return `${(n / 1e3).toFixed(1)}k`;
  return Number.isInteger(n) ? String(n) : n.toFixed(1);
}

function fmtTick(n) {
  return String(Math.round(n * 1000) / 1000);
}

function fmtMs(n) {
  return n === null || n === undefined ? "–" : `${n < 10 ? n.toFixed(2) : n.toFixed(1)} ms`;
}

function clock(ts) {
  const d = new Date(ts * 1000);
  return `${String(d.getHours()).padStart(2, "0")}:${String(d.getMinutes()).padStart(2, "0")}`;
}

function pct(n) {
  return `${(Math.round(n * 10) / 10).toFixed(n >= 10 || Number.isInteger(n) ? 0 : 1)}%`;
}

// --- data --------------------------------------------------------------------------------------------

async function getJSON(path) {
  const response = await fetch(path, { cache: "no-store" });
  if (!response.ok) throw new Error(`${path}: HTTP ${response.status}`);
  return response.json();
}

function seriesPath(metric, scopes) {
  const query = new URLSearchParams({ metric, since: String(-SERIES_WINDOW_S) });
  for (const scope of scopes) query.append("scope", scope);
  return `/api/series?${query}`;
}

async function refresh() {
  try {
    const [fleet, devices, rollouts] = await Promise.all([
      getJSON("/api/fleet"),
      getJSON("/api/devices"),
      getJSON("/api/rollouts"),
    ]);
    // The rollout under way gets its own line, so its devices can be compared with the fleet's.
    const live = rollouts.rollouts.find((r) => /^(running|paused)$/i.test(r.state));
    const scopes = [
      "fleet",
      ...(live ? [`rollout:${live.rollout_id}`] : []),
      ...fleet.groups.filter((g) => g.name !== null).map((g) => `group:${g.name}`),
    ].slice(0, MAX_LINES);
    const [latency, errors] = await Promise.all([
      getJSON(seriesPath("latency_p95", scopes)),
      getJSON(seriesPath("error_rate", scopes)),
    ]);
    renderSummary(fleet);
    renderRollouts(rollouts.rollouts);
    renderCharts(scopes, latency, errors);
    renderGroups(fleet.groups, devices.devices);
    const status = replace("status", `updated ${new Date().toLocaleTimeString()}`);
    status.className = "status";
    document.body.dataset.loaded = "true";
  } catch (err) {
    const status = replace("status", `disconnected: ${err.message}`);
    status.className = "status down";
  } finally {
    setTimeout(refresh, POLL_MS);
  }
}

// --- header tiles ------------------------------------------------------------------------------------

function tile(label, value, key, alert) {
  return h(
    "div",
    { class: alert ? "tile alert" : "tile", "data-key": key, "data-value": value },
    h("span", { class: "value" }, fmtNum(value)),
    h("span", { class: "label" }, label),
  );
}

function renderSummary(fleet) {
  const c = fleet.counters || {};
  const active = Object.entries(fleet.rollouts || {})
    .filter(([state]) => /^(pending|running|paused)$/i.test(state))
    .reduce((sum, [, n]) => sum + n, 0);
  replace(
    "summary",
    tile("devices", fleet.devices, "devices"),
    tile("online", fleet.online, "online", fleet.online < fleet.devices),
    tile("versions", Object.keys(fleet.versions || {}).length, "versions"),
    tile("active rollouts", active, "active_rollouts"),
    tile("messages", c.messages_ingested ?? 0, "messages_ingested"),
    tile("decode errors", c.decode_errors ?? 0, "decode_errors", (c.decode_errors ?? 0) > 0),
    tile("denied", c.denied_messages ?? 0, "denied_messages", (c.denied_messages ?? 0) > 0),
  );
}

// --- rollouts ----------------------------------------------------------------------------------------

const BAR_PARTS = [
  ["succeeded", ["SUCCEEDED"]],
  ["failed", ["FAILED", "REJECTED", "TIMED_OUT", "CANCELED"]],
  ["in_progress", ["IN_PROGRESS", "NOTIFIED", "RETRYING"]],
  ["queued", ["QUEUED", "PENDING", "DEFERRED"]],
];

function progressBar(states, total) {
  const bar = h("div", { class: "bar", role: "img" });
  let counted = 0;
  const known = new Set(BAR_PARTS.flatMap(([, names]) => names));
  const parts = BAR_PARTS.map(([cls, names]) => [cls, names.reduce((n, name) => n + (states[name] || 0), 0)]);
  const other = Object.entries(states).filter(([k]) => !known.has(k)).reduce((n, [, v]) => n + v, 0);
  parts.push(["other", other]);
  const title = [];
  for (const [cls, n] of parts) {
    if (!n) continue;
    counted += n;
    bar.append(h("span", { class: cls, style: `width:${(100 * n) / Math.max(total, 1)}%` }));
    title.push(`${n} ${cls.replace("_", " ")}`);
  }
  bar.setAttribute("title", title.join(", ") || "nothing reported yet");
  bar.setAttribute("aria-label", bar.getAttribute("title"));
  bar.dataset.reported = String(counted);
  return bar;
}

function waveRow(rollout, wave) {
  const states = wave.states || {};
  const succeeded = states.SUCCEEDED || 0;
  const failed = (states.FAILED || 0) + (states.REJECTED || 0) + (states.TIMED_OUT || 0);
  const kpis = Object.entries(wave.kpis || {}).map(([k, v]) => `${k} ${fmtNum(v)}`).join(" · ");
  return h(
    "tr",
    {
      class: "wave",
      "data-rollout": rollout.rollout_id,
      "data-wave": wave.index,
      "data-state": wave.state,
      "data-devices": wave.devices,
      "data-succeeded": succeeded,
      "data-failed": failed,
    },
    h("td", {}, `Wave ${wave.index + 1}`),
    h("td", {}, h("span", { class: `badge ${slug(wave.state)}` }, wave.state)),
    h("td", { class: "bar-cell" }, progressBar(states, wave.devices)),
    h("td", { class: "num" }, `${succeeded}/${wave.devices} ok`, failed ? ` · ${failed} failed` : ""),
    h("td", { class: "num" }, `${pct(wave.succeeded_pct || 0)}`),
    h("td", { class: "gate", title: [wave.gate, kpis].filter(Boolean).join(" — ") }, wave.gate || kpis || ""),
    h("td", { class: "num" }, wave.shadow_agreement === null || wave.shadow_agreement === undefined
      ? "" : pct(wave.shadow_agreement * 100)),
  );
}

function rolloutCard(r) {
  const succeeded = (r.states || {}).SUCCEEDED || 0;
  const head = h(
    "div",
    { class: "card-head" },
    h("span", { class: "name" }, r.rollout_id),
    h("span", { class: `badge ${slug(r.state)}` }, r.state),
    h("span", { class: "meta" }, `model ${r.version} · ${succeeded}/${r.devices} devices succeeded`),
    r.skipped ? h("span", { class: "meta" }, `${r.skipped} skipped`) : null,
    r.deferred ? h("span", { class: "meta" }, `${r.deferred} deferred`) : null,
    r.anomalies ? h("span", { class: "reason" }, `${r.anomalies} anomalies`) : null,
    r.reason ? h("span", { class: "reason" }, r.reason) : null,
  );
  const table = h(
    "table",
    { class: "waves" },
    h("colgroup", {}, ["wave", "state", "bar", "devices", "pct", "gate", "shadow"].map((c) => h("col", { class: `c-${c}` }))),
    h("thead", {}, h("tr", {}, ["wave", "state", "progress", "devices", "succeeded", "gate / KPIs", "shadow agreed"]
      .map((t) => h("th", {}, t)))),
    h("tbody", {}, (r.waves || []).map((w) => waveRow(r, w))),
  );
  return h("div", { class: "card rollout", "data-rollout": r.rollout_id, "data-state": r.state }, head, table);
}

function renderRollouts(rollouts) {
  if (!rollouts.length) {
    replace("rollouts", h("p", { class: "empty" }, "No rollouts yet."));
    return;
  }
  replace("rollouts", rollouts.slice(0, 8).map(rolloutCard));
}

// --- charts ------------------------------------------------------------------------------------------

const CHART = { w: 560, h: 200, left: 44, right: 22, top: 10, bottom: 22 };

// The axis top: four steps of 1, 2, 2.5 or 5 times a power of ten, so every tick label is round.
function niceMax(v) {
  if (!(v > 0)) return 4;
  const raw = v / 4;
  const p = 10 ** Math.floor(Math.log10(raw));
  for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= raw) return 4 * m * p;
  return 40 * p;
}

function drawChart(id, metric, scopes, payload, scale) {
  const byScope = new Map(payload.series.map((x) => [x.scope, x.points]));
  const now = Date.now() / 1000;
  const x0 = now - SERIES_WINDOW_S;
  let yMax = 0;
  let total = 0;
  for (const points of byScope.values()) {
    for (const [, v] of points) yMax = Math.max(yMax, v * scale);
    total += points.length;
  }
  yMax = niceMax(yMax * 1.05);
  const { w, h: ht, left, right, top, bottom } = CHART;
  const px = (t) => left + ((t - x0) / (now - x0)) * (w - left - right);
  const py = (v) => top + (1 - (v * scale) / yMax) * (ht - top - bottom);
  const svg = s("svg", {
    viewBox: `0 0 ${w} ${ht}`,
    "data-metric": metric,
    "data-count": total,
    role: "img",
  });
  for (let i = 0; i <= 4; i++) {
    const v = (yMax * i) / 4;
    const y = top + (1 - i / 4) * (ht - top - bottom);
    svg.append(s("line", { class: i ? "grid" : "axis", x1: left, x2: w - right, y1: y, y2: y }));
    const label = s("text", { x: left - 6, y: y + 3, "text-anchor": "end", text: fmtTick(v) });
    svg.append(label);
  }
  for (let i = 0; i <= 6; i++) {
    const t = x0 + (i * SERIES_WINDOW_S) / 6;
    svg.append(s("text", { x: px(t), y: ht - 6, "text-anchor": "middle", text: clock(t) }));
  }
  svg.append(s("line", { class: "axis", x1: left, x2: left, y1: top, y2: ht - bottom }));
  scopes.forEach((scope, i) => {
    const points = (byScope.get(scope) || []).filter(([t]) => t >= x0 - 60);
    const color = COLORS[i % COLORS.length];
    if (points.length) {
      const d = points.map(([t, v], k) => `${k ? "L" : "M"}${px(t).toFixed(1)},${py(v).toFixed(1)}`).join(" ");
      svg.append(s("path", { class: "line", d, stroke: color, "data-scope": scope, "data-count": points.length }));
      for (const [t, v] of points) {
        const dot = s("circle", { cx: px(t).toFixed(1), cy: py(v).toFixed(1), r: 2.5, fill: color, "data-scope": scope });
        const tip = s("title", { text: `${scope} ${clock(t)}: ${fmtNum(v * scale)}` });
        dot.append(tip);
        svg.append(dot);
      }
    }
  });
  if (!total) {
    svg.append(s("text", { class: "nodata", x: w / 2, y: ht / 2, "text-anchor": "middle", text: "no data yet" }));
  }
  replace(id, svg);
}

function renderCharts(scopes, latency, errors) {
  drawChart("chart-latency", "latency_p95", scopes, latency, 1);
  drawChart("chart-errors", "error_rate", scopes, errors, 100);
  replace(
    "legend",
    scopes.map((scope, i) =>
      h("span", {}, h("span", { class: "swatch", style: `background:${COLORS[i % COLORS.length]}` }),
        scope === "fleet" ? "whole fleet" : scope.replace(/^(group|rollout):/, "$1 ")),
    ),
  );
}

// --- devices by group --------------------------------------------------------------------------------

function deviceRow(d) {
  return h(
    "tr",
    {
      class: d.online ? "device online" : "device offline",
      "data-device": d.device_id,
      "data-version": d.model_version || "",
      "data-online": String(d.online),
    },
    h("td", { class: "mono" }, h("span", { class: d.online ? "dot on" : "dot off" }), d.device_id),
    h("td", {}, d.model_version || "none"),
    h("td", {}, d.online ? "online" : "offline"),
    h("td", {}, ago(d.last_seen)),
    h("td", { class: "num" }, fmtMs(d.latency_p95_ms)),
    h("td", { class: d.error_count ? "num errors-high" : "num" }, fmtNum(d.error_count)),
    h("td", { class: "num" }, fmtNum(d.inference_count)),
    h("td", {}, d.rollout_status
      ? h("span", { class: `badge ${slug(d.rollout_status)}`, title: d.rollout_id || "" }, d.rollout_status) : ""),
  );
}

function groupCard(group, byId) {
  const versions = Object.entries(group.versions).map(([v, n]) => `${v} ×${n}`).join(", ");
  // Past MAX_ROWS, the devices that need a look come first: offline, then with errors.
  let rows = group.device_ids.map((id) => byId.get(id)).filter(Boolean);
  const hidden = Math.max(0, rows.length - MAX_ROWS);
  if (hidden) {
    const rank = (d) => (d.online ? 2 : 0) + (d.error_count ? 0 : 1);
    rows = rows.slice().sort((a, b) => rank(a) - rank(b)).slice(0, MAX_ROWS);
  }
  return h(
    "div",
    { class: "card group", "data-group": group.name ?? "" },
    h(
      "div",
      { class: "card-head" },
      h("span", { class: "name" }, group.name ?? "no group"),
      h("span", { class: "meta" }, `${group.online}/${group.devices} online · ${versions}`),
    ),
    h(
      "table",
      { class: "devices" },
      h("thead", {}, h("tr", {}, ["device", "model", "status", "last seen", "p95", "errors", "inferences", "rollout"]
        .map((t, i) => h("th", { class: i >= 4 && i <= 6 ? "num" : "" }, t)))),
      h("tbody", {}, rows.map(deviceRow)),
    ),
    hidden ? h("p", { class: "empty" }, `${hidden} more not shown: /api/devices?group=${group.name ?? ""}`) : null,
  );
}

function renderGroups(groups, devices) {
  if (!devices.length) {
    replace("groups", h("p", { class: "empty" }, "No devices yet."));
    return;
  }
  const byId = new Map(devices.map((d) => [d.device_id, d]));
  const wrap = replace("groups", groups.map((g) => groupCard(g, byId)));
  wrap.className = "groups";
}

refresh();
