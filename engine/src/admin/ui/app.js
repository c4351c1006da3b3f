// The wasmq management UI: plain JavaScript with no dependencies, so the
// broker embeds and serves it as it is, offline, and it needs no build
// step to maintain. Every view reads the admin API with the logged-in
// user's credentials, so it shows exactly what the API lets that user see.
// The credentials live in this page's memory only (never in local or
// session storage): a reload asks for them again.
"use strict";

let auth = null; // "Basic ..." while logged in
let timer = null;
const rates = { publish: [], deliver_get: [], ack: [], confirm: [] };
let last = null;

const $ = (sel) => document.querySelector(sel);
const card = (label, v) => `<div class="card">${esc(label)}<b>${esc(v)}</b></div>`;
const esc = (v) => String(v ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));

async function api(path, body, method) {
  const init = { headers: { Authorization: auth, "X-Requested-With": "wasmq-ui" } };
  if (method) init.method = method;
  if (body instanceof Uint8Array) {
    init.method = method || "PUT";
    init.headers["Content-Type"] = "application/wasm";
    init.body = body;
  } else if (body !== undefined) {
    init.method = method || "POST";
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const r = await fetch(path, init);
  if (r.status === 401) { logout("Your session ended: log in again."); throw new Error("401"); }
  if (!r.ok) throw new Error(`${path}: ${r.status} ${(await r.json().catch(() => ({}))).reason || ""}`);
  // A 201 or 204 may have no body.
  const text = await r.text();
  return text ? JSON.parse(text) : null;
}

// Each view's filter text, kept across the view's refreshes.
const filters = {};
// The queues view's page and order.
const qstate = { page: 1, pages: 1, sort: "name", reverse: false };
// Each listed queue's counters at the previous refresh, for its rates.
const qseen = new Map();
const currentView = () => (location.hash || "#overview").slice(1);

function table(rows, columns, filterable) {
  const id = "t" + Math.random().toString(36).slice(2);
  const head = columns.map((c) => `<th>${esc(c[0])}</th>`).join("");
  const body = rows.map((r) => `<tr>${columns.map((c) => `<td>${c[1](r)}</td>`).join("")}</tr>`).join("");
  const filter = filterable ? `<input class="filter" placeholder="Filter by name" data-for="${id}" value="${esc(filters[currentView()] || "")}">` : "";
  return `${filter}<table id="${id}"><thead><tr>${head}</tr></thead><tbody>${body || `<tr><td colspan="${columns.length}">none</td></tr>`}</tbody></table>`;
}

function wireFilters() {
  document.querySelectorAll("input.filter").forEach((input) => {
    const apply = () => {
      filters[currentView()] = input.value;
      const needle = input.value.toLowerCase();
      document.querySelectorAll(`#${input.dataset.for} tbody tr`).forEach((tr) => {
        tr.hidden = needle !== "" && !tr.textContent.toLowerCase().includes(needle);
      });
    };
    input.addEventListener("input", apply);
    apply();
    if (document.activeElement === document.body && input.value) input.focus();
  });
}

function chart(canvas) {
  const ctx = canvas.getContext("2d");
  const w = (canvas.width = canvas.clientWidth * devicePixelRatio);
  const h = (canvas.height = canvas.clientHeight * devicePixelRatio);
  const all = Object.values(rates).flat();
  const max = Math.max(1, ...all);
  const colours = { publish: "#2f6fde", deliver_get: "#1a9b5b", ack: "#c77700", confirm: "#8a3ccf" };
  ctx.clearRect(0, 0, w, h);
  for (const [k, series] of Object.entries(rates)) {
    ctx.strokeStyle = colours[k];
    ctx.lineWidth = 2 * devicePixelRatio;
    ctx.beginPath();
    series.forEach((v, i) => {
      const x = (i / 59) * w;
      const y = h - (v / max) * (h - 8) - 4;
      i ? ctx.lineTo(x, y) : ctx.moveTo(x, y);
    });
    ctx.stroke();
  }
  return max;
}

// Run a test message through an exchange without enqueueing it, and show
// each step of its way with the plugin version that decided it.
function traceForm(vhost, name) {
  $("#trace").innerHTML =
    `<h2>Trace a message through <code>${esc(name)}</code></h2>` +
    `<form id="trace-form"><label>Routing key <input name="key"></label> ` +
    `<label>Body <input name="body"></label> <button type="submit">Trace</button></form><div id="trace-result"></div>`;
  $("#trace-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const f = new FormData(ev.target);
    const path = `/api/exchanges/${encodeURIComponent(vhost)}/${encodeURIComponent(name)}/trace`;
    try {
      const t = await api(path, { routing_key: f.get("key"), payload: f.get("body") });
      const steps = (t.steps || []).map((st) => {
        const { step, ...rest } = st;
        return `<li><b>${esc(step)}</b> <code>${esc(JSON.stringify(rest))}</code></li>`;
      }).join("");
      const queues = [...(t.queues || []), ...(t.forwarded || [])];
      $("#trace-result").innerHTML = `<ol class="steps">${steps}</ol>` +
        `<p>=> ${queues.length ? "queues: " + queues.map((q) => `<code>${esc(q)}</code>`).join(", ") : "no queue"}` +
        ` (${esc((t.took_us || 0).toFixed(1))} µs)</p>` +
        (t.faults || []).map((x) => `<p class="error">${esc(x)}</p>`).join("");
    } catch (e) {
      $("#trace-result").innerHTML = `<p class="error">${esc(e.message)}</p>`;
    }
  });
}

// The plugin page's log: its lines, and the live stream that adds to them
// (server-sent events read through fetch, which sends the credentials an
// EventSource cannot), ended when the page is left.
let plogLines = [];
let follow = null;

function renderLogs() {
  const el = $("#plogs");
  if (!el) return;
  el.innerHTML = table(plogLines.slice(-20).reverse(), [
    ["Level", (l) => esc(l.level)],
    ["Version", (l) => `<code>${esc(String(l.version).slice(0, 12))}</code>`],
    ["Message", (l) => esc(l.message)],
  ], false);
}

function stopFollowing() {
  if (follow) follow.abort();
  follow = null;
}

function followLogs(base) {
  stopFollowing();
  const ctl = new AbortController();
  follow = ctl;
  (async () => {
    const r = await fetch(`${base}/logs?follow=true`, { headers: { Authorization: auth, "X-Requested-With": "wasmq-ui" }, signal: ctl.signal });
    if (!r.ok || !r.body) return;
    const reader = r.body.getReader();
    const text = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buf += text.decode(value, { stream: true });
      let end;
      while ((end = buf.indexOf("\n\n")) >= 0) {
        const lines = buf.slice(0, end).split("\n");
        buf = buf.slice(end + 2);
        // Named events (`missed`) and keep-alives carry no log line.
        if (lines.some((l) => l.startsWith("event:"))) continue;
        const data = lines.filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trim()).join("\n");
        if (!data) continue;
        plogLines.push(JSON.parse(data));
        if (plogLines.length > 200) plogLines.shift();
        renderLogs();
      }
    }
  })().catch(() => {});
}

const views = {
  async overview() {
    const [o, nodes] = await Promise.all([api("/api/overview"), api("/api/nodes")]);
    // A node alone has no cluster status to ask for.
    const cluster = nodes.some((n) => n.cluster_addr) ? await api("/api/cluster") : null;
    const now = Date.now();
    const stats = o.message_stats || {};
    if (last) {
      const secs = Math.max(0.001, (now - last.at) / 1000);
      for (const k of Object.keys(rates)) {
        rates[k].push(Math.max(0, ((stats[k] || 0) - (last.stats[k] || 0)) / secs));
        if (rates[k].length > 60) rates[k].shift();
      }
    }
    last = { at: now, stats };
    const t = o.object_totals || {};
    const q = o.queue_totals || {};
    const alarms = Object.entries(o.alarms || {}).filter(([, on]) => on).map(([k]) => k);
    $("#page").innerHTML =
      `<h1>Overview</h1><p>${esc(o.product_name || "wasmq")} ${esc(o.product_version || "")}, up ${esc(o.uptime_secs)} s</p>` +
      `<div class="cards">${card("Connections", t.connections ?? 0)}${card("Channels", t.channels ?? 0)}${card("Queues", t.queues ?? 0)}${card("Exchanges", t.exchanges ?? 0)}${card("Consumers", t.consumers ?? 0)}${card("Ready", q.messages_ready ?? 0)}${card("Unacked", q.messages_unacknowledged ?? 0)}${card("Alarms", alarms.length ? alarms.join(", ") : "none")}</div>` +
      `<h2>Nodes</h2>` + (cluster ? `<p id="raft">Raft: this node <code>${esc(cluster.node)}</code> is ${esc(cluster.state)}, leader <code>${esc(cluster.leader || "none")}</code>, term ${esc(cluster.term)}</p>` : "") +
      `<div id="nodes">` + table(nodes, [
        ["Node", (n) => `<code>${esc(n.name)}</code>`],
        ["Running", (n) => esc(n.running === null || n.running === undefined ? "unknown" : n.running ? "yes" : "no")],
        ["Leader", (n) => esc(n.is_leader ? "yes" : "")],
        ["Voter", (n) => esc(n.voter ? "yes" : "no")],
        ["Log index", (n) => esc(n.log_index ?? "")],
      ], false) + `</div>` +
      `<h2>Message rates (msg/s)</h2><p class="legend"><span class="published">published</span><span class="delivered">delivered</span><span class="acked">acknowledged</span><span class="confirmed">confirmed</span> <span id="max"></span></p><canvas id="rates"></canvas>`;
    const max = chart($("#rates"));
    $("#max").textContent = `(scale up to ${max.toFixed(0)}/s)`;
  },
  // Queues are paged, filtered and sorted by the broker (RabbitMQ's
  // `page`, `name`, `sort` query), so 10,000 of them cost one page.
  async queues() {
    if (!$("#qtable")) {
      $("#page").innerHTML = `<h1>Queues</h1><input class="filter" id="qfilter" placeholder="Filter by name (server-side)" value="${esc(filters.queues || "")}"><div id="qtable"></div><div class="pager"><button id="qprev">Previous</button> <span id="qpage"></span> <button id="qnext">Next</button></div>`;
      let debounce = null;
      $("#qfilter").addEventListener("input", (e) => {
        filters.queues = e.target.value;
        qstate.page = 1;
        clearTimeout(debounce);
        debounce = setTimeout(() => views.queues().catch(() => {}), 250);
      });
      $("#qprev").addEventListener("click", () => { if (qstate.page > 1) { qstate.page--; views.queues(); } });
      $("#qnext").addEventListener("click", () => { if (qstate.page < qstate.pages) { qstate.page++; views.queues(); } });
    }
    const params = new URLSearchParams({ page: qstate.page, page_size: 100, sort: qstate.sort, sort_reverse: qstate.reverse });
    if (filters.queues) params.set("name", filters.queues);
    let p;
    try {
      p = await api("/api/queues?" + params);
    } catch (e) {
      // The page went away (queues deleted, a narrower filter): back to the first.
      if (qstate.page > 1 && e.message.includes("page out of range")) { qstate.page = 1; return views.queues(); }
      throw e;
    }
    qstate.pages = Math.max(p.page_count, 1);
    // Rates from the counters' change since the previous refresh (none on
    // a queue's first sight).
    const now = Date.now();
    const rate = new Map();
    for (const q of p.items) {
      const key = `${q.vhost}\u0000${q.name}`;
      const st = q.message_stats || {};
      const before = qseen.get(key);
      if (before) {
        const secs = Math.max(0.001, (now - before.at) / 1000);
        rate.set(key, {
          in: Math.max(0, ((st.publish || 0) - before.publish) / secs),
          out: Math.max(0, ((st.deliver_get || 0) - before.deliver_get) / secs),
        });
      }
      qseen.set(key, { at: now, publish: st.publish || 0, deliver_get: st.deliver_get || 0 });
    }
    const shown = (q, k) => {
      const r = rate.get(`${q.vhost}\u0000${q.name}`);
      return r ? r[k].toFixed(1) : "-";
    };
    const columns = [
      ["Name", "name", (q) => `<a href="#queue/${encodeURIComponent(q.vhost)}/${encodeURIComponent(q.name)}"><code>${esc(q.name)}</code></a>`],
      ["Vhost", "vhost", (q) => esc(q.vhost)],
      ["Type", "type", (q) => esc(q.type || "classic")],
      ["Ready", "messages_ready", (q) => esc(q.messages_ready)],
      ["Unacked", "messages_unacknowledged", (q) => esc(q.messages_unacknowledged)],
      ["Total", "messages", (q) => esc(q.messages ?? q.messages_ready + q.messages_unacknowledged)],
      ["In/s", "message_stats.publish", (q) => esc(shown(q, "in"))],
      ["Out/s", "message_stats.deliver_get", (q) => esc(shown(q, "out"))],
      ["Delayed", "messages_delayed", (q) => esc(q.messages_delayed ?? 0)],
      ["Consumers", "consumers", (q) => esc(q.consumers)],
      ["Policy", "policy", (q) => esc(q.policy || "")],
      ["Node", "node", (q) => esc(q.node || "")],
    ];
    const arrow = (key) => (qstate.sort === key ? (qstate.reverse ? " \u25bc" : " \u25b2") : "");
    const head = columns.map(([title, key]) => `<th><a href="#queues" class="sort" data-key="${key}">${esc(title)}${arrow(key)}</a></th>`).join("");
    const body = p.items.map((q) => `<tr>${columns.map((c) => `<td>${c[2](q)}</td>`).join("")}</tr>`).join("");
    $("#qtable").innerHTML = `<table><thead><tr>${head}</tr></thead><tbody>${body || `<tr><td colspan="${columns.length}">none</td></tr>`}</tbody></table>`;
    $("#qpage").textContent = `page ${p.page} of ${qstate.pages} (${p.filtered_count} of ${p.total_count} queues)`;
    document.querySelectorAll("a.sort").forEach((a) => a.addEventListener("click", (e) => {
      e.preventDefault();
      const key = a.dataset.key;
      // A new column sorts its largest first for counts, A to Z for names.
      if (qstate.sort === key) qstate.reverse = !qstate.reverse;
      else { qstate.sort = key; qstate.reverse = !["name", "vhost", "type", "policy", "node"].includes(key); }
      views.queues();
    }));
  },
  // A queue's own page: its figures, bindings and consumers (refreshed),
  // and what an operator does to it: get (peek or take), publish, purge
  // and delete, each through the API, the destructive ones confirmed.
  async queue(vhost, name) {
    const key = `${vhost}\u0000${name}`;
    const path = `/api/queues/${encodeURIComponent(vhost)}/${encodeURIComponent(name)}`;
    if (!$("#qdetail") || $("#qdetail").dataset.key !== key) {
      $("#page").innerHTML = `<h1>Queue <code>${esc(name)}</code> <small>in ${esc(vhost)}</small></h1><div id="qdetail"></div>` +
        `<h2>Get messages</h2><form id="qget"><label>Count <input name="count" type="number" value="1" min="1" max="100"></label> <label><input name="requeue" type="checkbox" checked> put them back (peek)</label> <button>Get</button></form><div id="qgot"></div>` +
        `<h2>Publish</h2><form id="qpub"><label>Payload <input name="payload" size="40"></label> <button>Publish</button></form><p id="qpubbed"></p>` +
        `<h2>Actions</h2><button id="qpurge">Purge</button> <button id="qdelete">Delete</button> <p id="qdone"></p>`;
      $("#qdetail").dataset.key = key;
      $("#qget").addEventListener("submit", async (e) => {
        e.preventDefault();
        const f = e.target;
        const got = await api(`${path}/get`, { count: Number(f.count.value) || 1, ackmode: f.requeue.checked ? "ack_requeue_true" : "ack_requeue_false" });
        $("#qgot").innerHTML = table(got, [
          ["Payload", (m) => `<code>${esc(m.payload)}</code>`],
          ["Routing key", (m) => esc(m.routing_key)],
          ["Exchange", (m) => esc(m.exchange || "(default)")],
          ["Redelivered", (m) => esc(m.redelivered)],
        ], false);
      });
      $("#qpub").addEventListener("submit", async (e) => {
        e.preventDefault();
        const r = await api(`/api/exchanges/${encodeURIComponent(vhost)}/amq.default/publish`, { routing_key: name, payload: e.target.payload.value, properties: { delivery_mode: 2 } });
        $("#qpubbed").textContent = r.routed ? "Published." : "Not routed.";
      });
      $("#qpurge").addEventListener("click", async () => {
        if (!confirm(`Purge every ready message of queue '${name}'?`)) return;
        await api(`${path}/contents`, undefined, "DELETE");
        $("#qdone").textContent = "Purged.";
      });
      $("#qdelete").addEventListener("click", async () => {
        if (!confirm(`Delete queue '${name}' and its messages?`)) return;
        await api(path, undefined, "DELETE");
        location.hash = "#queues";
      });
    }
    const [q, bindings, consumers] = await Promise.all([
      api(path),
      api(`/api/bindings/${encodeURIComponent(vhost)}`),
      api("/api/consumers"),
    ]);
    const st = q.stream;
    // A quorum queue's replication as the answering node's replica sees it.
    const qu = q.quorum;
    $("#qdetail").innerHTML =
      `<div class="cards">${card("Type", q.type || "classic")}${card("Ready", q.messages_ready)}${card("Unacked", q.messages_unacknowledged)}${card("Consumers", q.consumers)}${card("Durable", q.durable)}${card("Policy", q.policy || "none")}` +
      (st ? `${card("Offsets", `${st.first_offset}..${st.last_offset ?? "-"}`)}${card("Segments", st.segments)}` : "") + `</div>` +
      `<p>Arguments: <code>${esc(JSON.stringify(q.arguments))}</code></p>` +
      (qu ? `<h2>Replicas</h2><div id="replicas"><p>Leader <code>${esc(qu.leader || "none")}</code>, term ${esc(qu.term)}, log ${esc(qu.last_log_index ?? "-")}, applied ${esc(qu.last_applied ?? "-")}</p>` +
        table(qu.members, [
          ["Member", (m) => `<code>${esc(m.node)}</code>${m.node === qu.leader ? " (leader)" : ""}`],
          ["Matched index", (m) => esc(m.matched ?? "")],
        ], false) + `</div>` : "") +
      `<h2>Bindings</h2>` + table(bindings.filter((b) => b.destination_type === "queue" && b.destination === name), [
        ["From", (b) => `<code>${esc(b.source)}</code>`],
        ["Key", (b) => `<code>${esc(b.routing_key)}</code>`],
        ["Arguments", (b) => `<code>${esc(JSON.stringify(b.arguments))}</code>`],
      ], false) +
      `<h2>Consumers</h2>` + table(consumers.filter((c) => c.queue.name === name && c.queue.vhost === vhost), [
        ["Tag", (c) => `<code>${esc(c.consumer_tag)}</code>`],
        ["Channel", (c) => esc(c.channel)],
        ["Prefetch", (c) => esc(c.prefetch_count)],
        ["Unacked", (c) => esc(c.messages_unacknowledged)],
      ], false);
  },
  async exchanges() {
    const xs = await api("/api/exchanges");
    // The trace panel is kept across the table's refreshes.
    if (!$("#xtable")) $("#page").innerHTML = `<h1>Exchanges</h1><div id="xtable"></div><div id="trace"></div>`;
    $("#xtable").innerHTML = table(xs, [
      ["Name", (x) => (x.name ? `<a href="#exchange/${encodeURIComponent(x.vhost)}/${encodeURIComponent(x.name)}"><code>${esc(x.name)}</code></a>` : "<code>(default)</code>")],
      ["Vhost", (x) => esc(x.vhost)],
      ["Type", (x) => esc(x.type)],
      ["Router", (x) => `${esc(x.plugin.router)} <code>${esc((x.plugin.router_hash || "").slice(0, 12))}</code>`],
      ["Transform", (x) => esc(x.plugin.transform || "")],
      ["Published", (x) => esc(x.message_stats.publish_in)],
      ["Routed", (x) => esc(x.message_stats.routed)],
      ["Faults", (x) => esc(x.message_stats.plugin_faults)],
      ["", (x) => (x.name ? `<button class="trace" data-vhost="${esc(x.vhost)}" data-name="${esc(x.name)}">Trace</button>` : "")],
    ], true);
    wireFilters();
    document.querySelectorAll("button.trace").forEach((b) => b.addEventListener("click", () => traceForm(b.dataset.vhost, b.dataset.name)));
  },
  // An exchange's own page: the plugins that decide for it (router and
  // its version, transform), its alternate and dead-letter settings, its
  // bindings with their filters, its counts, and a test message's trace.
  async exchange(vhost, name) {
    const key = `${vhost}\u0000${name}`;
    if (!$("#xdetail") || $("#xdetail").dataset.key !== key) {
      $("#page").innerHTML = `<h1>Exchange <code>${esc(name)}</code> <small>in ${esc(vhost)}</small></h1><div id="xdetail"></div><div id="trace"></div>`;
      $("#xdetail").dataset.key = key;
      traceForm(vhost, name);
    }
    const [x, bindings] = await Promise.all([
      api(`/api/exchanges/${encodeURIComponent(vhost)}/${encodeURIComponent(name)}`),
      api(`/api/bindings/${encodeURIComponent(vhost)}`),
    ]);
    const args = x.arguments || {};
    const m = x.message_stats || {};
    $("#xdetail").innerHTML =
      `<div class="cards">${card("Type", x.type)}${card("Router", `${x.plugin.router} ${(x.plugin.router_hash || "").slice(0, 12)}`)}${card("Transform", x.plugin.transform || "none")}${card("Alternate", args["alternate-exchange"] || "none")}${card("Durable", x.durable)}${card("Policy", x.policy || "none")}</div>` +
      `<div class="cards">${card("Published", m.publish_in ?? 0)}${card("Routed", m.routed ?? 0)}${card("Unroutable", m.unroutable ?? 0)}${card("Plugin faults", m.plugin_faults ?? 0)}</div>` +
      `<p>Arguments: <code>${esc(JSON.stringify(args))}</code></p>` +
      `<h2>Bindings</h2>` + table(bindings.filter((b) => b.source === name), [
        ["To", (b) => `${esc(b.destination_type)} <code>${esc(b.destination)}</code>`],
        ["Key", (b) => `<code>${esc(b.routing_key)}</code>`],
        ["Filter", (b) => esc((b.arguments || {})["x-wasmq-filter"] || "")],
        ["Arguments", (b) => `<code>${esc(JSON.stringify(b.arguments))}</code>`],
      ], false);
  },
  // The plugins serving, and a form to upload a new one (or a new version
  // of one, served at once): the file goes to the plugin folder as if
  // dropped there, so a cluster agrees on it as on any dropped file.
  async plugins() {
    if (!$("#plist")) {
      $("#page").innerHTML = `<div id="pluginswrap"><h1>Plugins</h1>` +
        `<form id="pupload" class="inline"><b>Upload a plugin</b> <input name="pname" placeholder="name" required> <input type="file" name="file" accept=".wasm"> <button>Upload</button></form><p id="pupload-msg"></p><div id="plist"></div></div>`;
      $("#pupload").addEventListener("submit", async (e) => {
        e.preventDefault();
        const f = e.target;
        if (!f.file.files.length) { $("#pupload-msg").textContent = "Choose a .wasm file first."; return; }
        try {
          const v = await api(`/api/plugins/${encodeURIComponent(f.pname.value)}`, new Uint8Array(await f.file.files[0].arrayBuffer()), "PUT");
          $("#pupload-msg").textContent = `Uploaded ${v.name}, version ${String(v.hash).slice(0, 12)}.`;
          f.reset();
        } catch (err) {
          $("#pupload-msg").textContent = err.message;
        }
        views.plugins();
      });
    }
    const ps = await api("/api/plugins");
    $("#plist").innerHTML = table(ps, [
      ["Name", (p) => `<a href="#plugin/${encodeURIComponent(p.name)}"><code>${esc(p.name)}</code></a>`],
      ["State", (p) => esc(p.state)],
      ["Roles", (p) => esc(p.roles || "")],
      ["Hash", (p) => `<code>${esc((p.hash || "").slice(0, 12))}</code>`],
      ["Calls", (p) => esc(p.calls)],
      ["Faults", (p) => esc(p.faults)],
    ], true);
    wireFilters();
  },
  // A plugin's own page: the serving version's figures, the versions kept
  // (roll back to one), a candidate on trial with its figures and
  // controls, staging a new file as a shadow or a canary, and its latest
  // log lines (refreshed every 2 s).
  async plugin(name) {
    const base = `/api/plugins/${encodeURIComponent(name)}`;
    if (!$("#pdetail") || $("#pdetail").dataset.key !== name) {
      $("#page").innerHTML = `<div id="pwrap"><h1>Plugin <code>${esc(name)}</code></h1><div id="pdetail"></div>` +
        `<h2>Candidate</h2><div id="pcand"></div>` +
        `<form id="pstage"><label>New version <input type="file" name="file" accept=".wasm"></label> <select name="mode"><option value="shadow">shadow</option><option value="canary">canary</option></select> <label>canary share % <input name="percent" type="number" value="10" min="1" max="100"></label> <button>Stage</button></form><p id="pstaged"></p>` +
        `<h2>Versions kept</h2><div id="pversions"></div><div id="pcluster"></div><h2>Log, live</h2><div id="plogs"></div></div>`;
      $("#pdetail").dataset.key = name;
      // The latest lines, then each new one as the plugin writes it.
      plogLines = await api(`${base}/logs`).catch(() => []);
      renderLogs();
      followLogs(base);
      $("#pstage").addEventListener("submit", async (e) => {
        e.preventDefault();
        const f = e.target;
        if (!f.file.files.length) { $("#pstaged").textContent = "Choose a .wasm file first."; return; }
        const q = new URLSearchParams({ mode: f.mode.value });
        if (f.mode.value === "canary") q.set("percent", f.percent.value);
        try {
          await api(`${base}/candidate?${q}`, new Uint8Array(await f.file.files[0].arrayBuffer()), "PUT");
          $("#pstaged").textContent = "Staged.";
        } catch (err) {
          $("#pstaged").textContent = err.message;
        }
        views.plugin(name);
      });
      // Buttons inside refreshed parts: one listener for them all.
      $("#pwrap").addEventListener("click", async (e) => {
        const b = e.target.closest("button[data-act]");
        if (!b) return;
        const act = b.dataset.act;
        if (act === "abort" && !confirm(`Abort the candidate of '${name}'?`)) return;
        if (act === "rollback" && !confirm(`Serve version ${b.dataset.hash.slice(0, 12)} of '${name}' again?`)) return;
        try {
          if (act === "abort") await api(`${base}/candidate`, undefined, "DELETE");
          if (act === "promote") await api(`${base}/candidate/promote`, {});
          if (act === "canary") await api(`${base}/candidate/canary`, {});
          if (act === "rollback") await api(`${base}/rollback`, { hash: b.dataset.hash });
          $("#pstaged").textContent = `Done: ${act}.`;
        } catch (err) {
          $("#pstaged").textContent = err.message;
        }
        views.plugin(name);
      });
    }
    const [plugins, versions, rollouts] = await Promise.all([
      api("/api/plugins"),
      api(`${base}/versions`),
      api("/api/rollouts"),
    ]);
    const p = plugins.find((x) => x.name === name) || {};
    $("#pdetail").innerHTML = `<div class="cards">${card("State", p.state || "unknown")}${card("Roles", p.roles || "")}${card("Hash", (p.hash || "").slice(0, 12))}${card("Calls", p.calls ?? 0)}${card("Faults", p.faults ?? 0)}${card("p99", p.latency_us && p.latency_us.p99 != null ? `${p.latency_us.p99} µs` : "-")}${card("Circuit", p.circuit || "-")}${card("Self-tests passed", p.self_tests ?? 0)}${card("Code", p.code || "")}</div>`;
    const c = (rollouts.candidates || []).find((x) => x.plugin === name);
    $("#pcand").innerHTML = !c ? `<p id="nocand">No candidate on trial.</p>` :
      `<div class="cards">${card("Mode", c.mode.mode + (c.mode.percent ? ` ${c.mode.percent}%` : ""))}${card("Hash", c.hash.slice(0, 12))}${card("Calls", c.calls)}${card("Faults", c.faults)}${card("Agree / disagree", `${c.agreements} / ${c.disagreements}`)}${card("Running", `${c.running_secs} s`)}</div>` +
      (c.failure ? `<p class="error">${esc(c.failure)}</p>` : "") +
      (c.disagreement_samples || []).slice(0, 3).map((d) => `<p>Disagreed on <code>${esc(d.routing_key)}</code>: serving ${esc(d.serving)}, candidate ${esc(d.candidate)}</p>`).join("") +
      `<button data-act="promote">Promote</button> ${c.mode.mode === "shadow" ? `<button data-act="canary">Make it a canary</button> ` : ""}<button data-act="abort">Abort</button>`;
    $("#pversions").innerHTML = table(versions, [
      ["Hash", (v) => `<code>${esc(v.hash.slice(0, 12))}</code>`],
      ["Serving", (v) => esc(v.serving ? "yes" : "")],
      ["Last served", (v) => esc(v.served_at ? new Date(v.served_at * 1000).toISOString() : "")],
      ["Size", (v) => esc(v.size)],
      ["", (v) => (v.serving ? "" : `<button data-act="rollback" data-hash="${esc(v.hash)}">Roll back to it</button>`)],
    ], false);
    // In a cluster: the versions every node keeps, who took each and who
    // refused it (and why).
    $("#pcluster").innerHTML = !(p.cluster || []).length ? "" : `<h2>In the cluster</h2>` + table(p.cluster, [
      ["Hash", (v) => `<code>${esc(v.hash.slice(0, 12))}</code>`],
      ["Active", (v) => esc(v.active ? "yes" : "")],
      ["From", (v) => esc(v.from)],
      ["Ready on", (v) => esc((v.ready || []).join(", "))],
      ["Refused by", (v) => esc(Object.entries(v.refused || {}).map(([n, why]) => `${n}: ${why}`).join("; "))],
    ], false);
  },
  // Users, vhosts, permissions, policies and limits, as the run-time
  // operations API gives them, with forms to add a user, set a user's
  // permissions and add a policy, and a delete button on each user and
  // policy (asked to confirm). The forms are made once; the lists under
  // them refresh. A section the user may not read says so, and an action
  // the API refuses shows its reason.
  async admin() {
    if (!$("#adminlists")) {
      $("#page").innerHTML = `<div id="adminwrap"><h1>Admin</h1>` +
        `<form id="adduser" class="inline"><b>Add a user</b> <input name="uname" placeholder="name" required> <input name="password" type="password" placeholder="password"> <input name="tags" placeholder="tags, e.g. management"> <button>Add user</button></form>` +
        `<form id="setperm" class="inline"><b>Permissions</b> <input name="user" placeholder="user" required> <input name="vhost" value="/" required> <input name="configure" value=".*"> <input name="write" value=".*"> <input name="read" value=".*"> <button>Set permissions</button></form>` +
        `<form id="addpolicy" class="inline"><b>Add a policy</b> <input name="pname" placeholder="name" required> <input name="vhost" value="/" required> <input name="pattern" placeholder="pattern, e.g. ^orders\\." required> <select name="applyto"><option>queues</option><option>classic_queues</option><option>quorum_queues</option><option>streams</option><option>exchanges</option><option>all</option></select> <input name="priority" type="number" value="0"> <input name="definition" placeholder='{"max-length": 1000}' required> <button>Add policy</button></form>` +
        `<form id="addvhost" class="inline"><b>Add a vhost</b> <input name="vname" placeholder="name" required> <input name="description" placeholder="description"> <button>Add vhost</button></form>` +
        `<form id="setlimit" class="inline"><b>Set a limit</b> <select name="on"><option value="vhost">vhost</option><option value="user">user</option></select> <input name="target" placeholder="vhost or user name" required> <select name="limit"><option>max-connections</option><option>max-queues</option><option>max-channels</option></select> <input name="value" type="number" placeholder="value (negative: none)" required> <button>Set limit</button></form>` +
        `<p id="admin-msg"></p><div id="adminlists"></div></div>`;
      const act = async (what, call) => {
        try {
          await call();
          $("#admin-msg").textContent = `Done: ${what}.`;
        } catch (err) {
          $("#admin-msg").textContent = err.message;
        }
        views.admin();
      };
      const seg = encodeURIComponent;
      $("#adduser").addEventListener("submit", (e) => {
        e.preventDefault();
        const f = e.target;
        const body = { tags: f.tags.value };
        if (f.password.value) body.password = f.password.value;
        // (A form's own `name` hides a field of that name: hence `uname`.)
        act(`user ${f.uname.value} added`, () => api(`/api/users/${seg(f.uname.value)}`, body, "PUT")).then(() => f.reset());
      });
      $("#setperm").addEventListener("submit", (e) => {
        e.preventDefault();
        const f = e.target;
        act(`permissions of ${f.user.value} set`, () => api(`/api/permissions/${seg(f.vhost.value)}/${seg(f.user.value)}`,
          { configure: f.configure.value, write: f.write.value, read: f.read.value }, "PUT"));
      });
      $("#addpolicy").addEventListener("submit", (e) => {
        e.preventDefault();
        const f = e.target;
        let definition;
        try { definition = JSON.parse(f.definition.value); } catch (err) { $("#admin-msg").textContent = `definition: ${err.message}`; return; }
        act(`policy ${f.pname.value} set`, () => api(`/api/policies/${seg(f.vhost.value)}/${seg(f.pname.value)}`,
          { pattern: f.pattern.value, "apply-to": f.applyto.value, priority: Number(f.priority.value), definition }, "PUT"));
      });
      $("#addvhost").addEventListener("submit", (e) => {
        e.preventDefault();
        const f = e.target;
        act(`vhost ${f.vname.value} added`, () => api(`/api/vhosts/${seg(f.vname.value)}`, { description: f.description.value }, "PUT")).then(() => f.reset());
      });
      $("#setlimit").addEventListener("submit", (e) => {
        e.preventDefault();
        const f = e.target;
        const path = f.on.value === "vhost" ? "vhost-limits" : "user-limits";
        act(`${f.limit.value} of ${f.on.value} ${f.target.value} set`,
          () => api(`/api/${path}/${seg(f.target.value)}/${seg(f.limit.value)}`, { value: Number(f.value.value) }, "PUT"));
      });
      $("#adminwrap").addEventListener("click", (e) => {
        const b = e.target.closest("button[data-del]");
        if (!b) return;
        const { del, name, vhost } = b.dataset;
        const what = del.endsWith("-limit") ? `${name} of ${del.replace("-limit", "")} '${b.dataset.target}'` : `${del} '${name}'`;
        if (!confirm(`${del.endsWith("-limit") ? "Clear" : "Delete"} ${what}?`)) return;
        if (del === "user") act(`user ${name} deleted`, () => api(`/api/users/${seg(name)}`, undefined, "DELETE"));
        if (del === "policy") act(`policy ${name} deleted`, () => api(`/api/policies/${seg(vhost)}/${seg(name)}`, undefined, "DELETE"));
        if (del === "vhost") act(`vhost ${name} deleted`, () => api(`/api/vhosts/${seg(name)}`, undefined, "DELETE"));
        if (del === "vhost-limit" || del === "user-limit") {
          const [target, limit] = [b.dataset.target, name];
          act(`${limit} of ${target} cleared`, () => api(`/api/${del}s/${seg(target)}/${seg(limit)}`, undefined, "DELETE"));
        }
      });
    }
    const list = (v) => (Array.isArray(v) ? v.join(", ") : typeof v === "object" && v !== null ? JSON.stringify(v) : String(v ?? ""));
    // Each limit with a button that clears it.
    const limits = (kind, target, value) => Object.entries(value || {}).map(([k, v]) =>
      `<code>${esc(k)}=${esc(v)}</code> <button data-del="${kind}" data-target="${esc(target)}" data-name="${esc(k)}" title="clear">×</button>`).join(" ");
    const section = async (title, path, columns) => {
      try {
        return `<h2>${esc(title)}</h2>` + table(await api(path), columns, false);
      } catch (e) {
        return `<h2>${esc(title)}</h2><p class="error">${esc(e.message)}</p>`;
      }
    };
    const parts = await Promise.all([
      section("Users", "/api/users", [
        ["Name", (u) => `<code>${esc(u.name)}</code>`],
        ["Tags", (u) => esc(list(u.tags))],
        ["Limits", (u) => `<code>${esc(list(u.limits || {}))}</code>`],
        ["", (u) => `<button data-del="user" data-name="${esc(u.name)}">Delete</button>`],
      ]),
      section("Virtual hosts", "/api/vhosts", [
        ["Name", (v) => `<code>${esc(v.name)}</code>`],
        ["Description", (v) => esc(v.description || "")],
        ["Messages", (v) => esc(v.messages ?? 0)],
        ["", (v) => `<button data-del="vhost" data-name="${esc(v.name)}">Delete</button>`],
      ]),
      section("Permissions", "/api/permissions", [
        ["User", (p) => esc(p.user)],
        ["Vhost", (p) => esc(p.vhost)],
        ["Configure", (p) => `<code>${esc(p.configure)}</code>`],
        ["Write", (p) => `<code>${esc(p.write)}</code>`],
        ["Read", (p) => `<code>${esc(p.read)}</code>`],
      ]),
      section("Policies", "/api/policies", [
        ["Name", (p) => `<code>${esc(p.name)}</code>`],
        ["Vhost", (p) => esc(p.vhost)],
        ["Pattern", (p) => `<code>${esc(p.pattern)}</code>`],
        ["Apply to", (p) => esc(p["apply-to"])],
        ["Priority", (p) => esc(p.priority)],
        ["Definition", (p) => `<code>${esc(JSON.stringify(p.definition))}</code>`],
        ["", (p) => `<button data-del="policy" data-name="${esc(p.name)}" data-vhost="${esc(p.vhost)}">Delete</button>`],
      ]),
      section("Operator policies", "/api/operator-policies", [
        ["Name", (p) => `<code>${esc(p.name)}</code>`],
        ["Vhost", (p) => esc(p.vhost)],
        ["Pattern", (p) => `<code>${esc(p.pattern)}</code>`],
        ["Definition", (p) => `<code>${esc(JSON.stringify(p.definition))}</code>`],
      ]),
      section("Vhost limits", "/api/vhost-limits", [
        ["Vhost", (l) => esc(l.vhost)],
        ["Limits", (l) => limits("vhost-limit", l.vhost, l.value)],
      ]),
      section("User limits", "/api/user-limits", [
        ["User", (l) => esc(l.user)],
        ["Limits", (l) => limits("user-limit", l.user, l.value)],
      ]),
    ]);
    $("#adminlists").innerHTML = parts.join("");
  },
  // Connections (each with a close button, asked to confirm) and their
  // channels.
  async connections() {
    if (!$("#connlists")) {
      $("#page").innerHTML = `<div id="connwrap"><h1>Connections</h1><p id="conn-msg"></p><div id="connlists"></div></div>`;
      $("#connwrap").addEventListener("click", async (e) => {
        const b = e.target.closest("button[data-close]");
        if (!b || !confirm(`Close connection ${b.dataset.close} (${b.dataset.peer})?`)) return;
        try {
          await api(`/api/connections/${encodeURIComponent(b.dataset.close)}`, undefined, "DELETE");
          $("#conn-msg").textContent = `Closed connection ${b.dataset.close}.`;
        } catch (err) {
          $("#conn-msg").textContent = err.message;
        }
        views.connections();
      });
    }
    const [cs, chs] = await Promise.all([api("/api/connections"), api("/api/channels")]);
    $("#connlists").innerHTML = table(cs, [
      ["Peer", (c) => esc(c.peer)],
      ["Client", (c) => esc(c.client || "")],
      ["User", (c) => esc(c.user)],
      ["Vhost", (c) => esc(c.vhost)],
      ["Channels", (c) => esc(c.channels)],
      ["TLS", (c) => esc(c.ssl ? c.ssl_protocol || "yes" : "")],
      ["", (c) => `<button data-close="${esc(c.name)}" data-peer="${esc(c.peer)}">Close</button>`],
    ], false) + `<h2>Channels</h2>` + table(chs, [
      ["Channel", (c) => esc(c.name)],
      ["User", (c) => esc(c.user)],
      ["Vhost", (c) => esc(c.vhost)],
      ["Confirm", (c) => esc(c.confirm ? "yes" : "")],
      ["Prefetch", (c) => esc(c.prefetch_count)],
      ["Unacked", (c) => esc(c.messages_unacknowledged)],
    ], false);
  },
};

async function show() {
  const view = currentView();
  document.querySelectorAll("#nav a").forEach((a) => a.classList.toggle("active", a.getAttribute("href") === "#" + view));
  clearTimeout(timer);
  try {
    // `#queue/VHOST/NAME`: a view with its arguments.
    const [base, ...args] = view.split("/");
    if (base !== "plugin" && follow) stopFollowing();
    await (views[base] || views.overview)(...args.map(decodeURIComponent));
  } catch (e) {
    if (auth) $("#page").innerHTML = `<p class="error">${esc(e.message)}</p>`;
  }
  if (auth) timer = setTimeout(show, 2000);
}

function logout(why) {
  stopFollowing();
  auth = null;
  clearTimeout(timer);
  last = null;
  for (const k of Object.keys(rates)) rates[k] = [];
  $("#nav").hidden = $("#logout").hidden = $("#page").hidden = true;
  // Nothing the last user could see stays in the page for the next.
  $("#page").innerHTML = "";
  $("#who").textContent = "";
  $("#login").hidden = false;
  $("#login-error").textContent = why || "";
}

$("#login").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const form = new FormData(ev.target);
  const user = form.get("username");
  const candidate = "Basic " + btoa(unescape(encodeURIComponent(`${user}:${form.get("password")}`)));
  const r = await fetch("/api/whoami", { headers: { Authorization: candidate, "X-Requested-With": "wasmq-ui" } });
  if (!r.ok) {
    $("#login-error").textContent = r.status === 401 ? "Wrong username or password." : `Refused: ${(await r.json().catch(() => ({}))).reason || r.status}`;
    return;
  }
  auth = candidate;
  ev.target.reset();
  $("#login").hidden = true;
  $("#nav").hidden = $("#logout").hidden = $("#page").hidden = false;
  $("#who").textContent = user;
  show();
});
$("#logout").addEventListener("click", () => logout());
window.addEventListener("hashchange", () => auth && show());
