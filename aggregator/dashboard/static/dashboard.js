// FaceFed fleet dashboard: renders /api/status and follows /events (server-sent events). No build step.
"use strict";
window.FaceFedDashboard = (function () {
  const token = new URLSearchParams(location.search).get("token");
  const withToken = (path) => token ? `${path}${path.includes("?") ? "&" : "?"}token=${encodeURIComponent(token)}` : path;
  const $ = (id) => document.getElementById(id);
  const esc = (v) => String(v ?? "").replace(/[&<>"']/g, (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c]));
  const num = (v, digits) => (typeof v === "number" ? v.toFixed(digits) : "–");
  const mb = (b) => (typeof b === "number" ? (b / 1e6).toFixed(2) : "–");
  const when = (t) => (typeof t === "number" ? new Date(t * 1000).toLocaleTimeString() : "–");
  let clockOffset = 0;  // server time - browser time, seconds
  let last = null;

  function ago(t) {
    if (typeof t !== "number") return "never";
    const s = Math.max(0, Date.now() / 1000 + clockOffset - t);
    return s < 60 ? `${s.toFixed(0)} s ago` : s < 3600 ? `${(s / 60).toFixed(0)} min ago` : when(t);
  }

  function follow(onStatus) {
    const connection = $("connection");
    fetch(withToken("/api/status")).then((r) => r.json()).then(onStatus);
    const source = new EventSource(withToken("/events"));
    source.addEventListener("status", (e) => onStatus(JSON.parse(e.data)));
    source.onopen = () => { if (connection) { connection.textContent = "live"; connection.className = "pill ok"; } };
    source.onerror = () => { if (connection) { connection.textContent = "reconnecting…"; connection.className = "pill bad"; } };
  }

  // ---- fleet page ------------------------------------------------------------------
  const charts = {};
  const SERIES = {
    quality: [["val_accuracy", "accuracy", "#2563eb"], ["eer", "EER", "#dc2626"], ["tar_at_far_1e-3", "TAR@FAR 1e-3", "#16a34a"]],
    seconds: [["seconds", "seconds", "#7c3aed"]],
    bytes: [["mb_up", "MB up", "#ea580c"], ["mb_down", "MB down", "#0891b2"]],
  };

  function chartData(rounds, name) {
    const x = rounds.map((r) => r.round);
    return [x, ...SERIES[name].map(([key]) => rounds.map((r) => {
      const v = key === "mb_up" ? r.bytes_up / 1e6 : key === "mb_down" ? r.bytes_down / 1e6 : r[key];
      return typeof v === "number" ? v : null;
    }))];
  }

  function drawCharts(rounds) {
    for (const name of Object.keys(SERIES)) {
      // Round 0 is the initial model: a starting score, but no duration and no traffic.
      const data = chartData(name === "quality" ? rounds : rounds.filter((r) => r.round > 0), name);
      if (charts[name]) { charts[name].setData(data); continue; }
      const el = $(`chart-${name}`);
      charts[name] = new uPlot({
        width: Math.max(280, el.clientWidth || 360), height: 200,
        // From zero: scores live in [0, 1]; seconds and bytes of near-equal rounds would otherwise zoom into noise.
        scales: {x: {time: false}, y: {range: (u, min, max) => [0, name === "quality" ? 1 : Math.max(max * 1.1, 1e-3)]}},
        axes: [{label: "round", incrs: [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000]}, {}],
        series: [{label: "round"}, ...SERIES[name].map(([, label, stroke]) => ({label, stroke, width: 2, points: {size: 7}}))],
      }, data, el);
    }
  }

  function renderRound(c, status) {
    $("round-number").textContent = status.round ?? "–";
    const state = $("round-state");
    if (!c) { state.textContent = "waiting"; return; }
    state.textContent = c.state;
    state.className = `pill state-${c.state}`;
    $("round-model").textContent = `v${c.model_version}`;
    $("quorum").textContent = `${c.accepted} / ${c.quorum}`;
    $("quorum-bar").style.width = `${Math.min(100, 100 * c.accepted / Math.max(1, c.quorum))}%`;
    $("round-accepted").textContent = c.accepted_devices.join(", ") || "none yet";
    $("round-rejected").textContent = String(c.rejected);
    $("round-bytes").textContent = `${mb(c.bytes_in)} MB / ${mb(c.bytes_out)} MB`;
    $("refusals").innerHTML = c.refusals.length ? c.refusals.slice().reverse().map((r) =>
      `<li><b>${esc(r.device_id)}</b>: <span class="reason">${esc(r.reason)}</span> <small>${when(r.time)}</small></li>`).join("")
      : '<li class="empty">none</li>';
  }

  function tickCountdown() {
    const c = last && last.current;
    const el = $("round-countdown");
    if (!c || c.state === "finished") { el.textContent = "–"; return; }
    const left = c.deadline - (Date.now() / 1000 + clockOffset);
    el.textContent = left > 0 ? `${Math.floor(left / 60)}:${String(Math.floor(left % 60)).padStart(2, "0")}` : "passed";
  }

  function renderDevices(devices) {
    $("devices").tBodies[0].innerHTML = devices.map((d) => `<tr data-device="${esc(d.device_id)}" class="${d.online ? "online" : "offline"}">
      <td><a href="${withToken(`/devices/${encodeURIComponent(d.device_id)}`)}">${esc(d.device_id)}</a></td>
      <td class="state"><span class="dot"></span>${esc(d.state)}</td>
      <td class="seen">${ago(d.last_seen)}</td><td>${esc(d.profile) || "–"}</td>
      <td>${d.model_version == null ? "–" : "v" + d.model_version}</td>
      <td>${d.last_contributed ?? "–"}</td><td>${esc(d.train_window) || "–"}</td>
      <td class="refusal">${d.last_refusal ? `r${d.last_refusal_round}: ${esc(d.last_refusal)}` : "–"}</td>
      <td class="reported">${d.reported_refusals.length ? esc(d.reported_refusals[d.reported_refusals.length - 1]) : "–"}</td></tr>`).join("");
  }

  function renderRounds(rounds) {
    $("rounds").tBodies[0].innerHTML = rounds.slice().reverse().map((r) => `<tr data-round="${r.round}">
      <td>${r.round}</td><td>${r.clients ?? "–"}</td><td>${r.rejected ?? "–"}</td><td>${num(r.val_accuracy, 4)}</td>
      <td>${num(r.eer, 4)}</td><td>${num(r["tar_at_far_1e-3"], 4)}</td><td>${num(r.seconds, 1)}</td>
      <td>${mb(r.bytes_up)} / ${mb(r.bytes_down)}</td></tr>`).join("");
  }

  function renderModels(models, fingerprint) {
    $("key-fingerprint").textContent = fingerprint || "no key given to the dashboard";
    $("models").tBodies[0].innerHTML = models.slice().reverse().map((m) => `<tr data-version="${m.model_version}">
      <td>v${m.model_version}</td><td><code title="${esc(m.sha256)}">${esc(m.sha256.slice(0, 16))}…</code></td><td>${esc(m.codec)}</td>
      <td>${!m.signed ? "unsigned" : m.signature_valid === true ? "valid" : m.signature_valid === false ? "INVALID" : "signed (not checked)"}</td>
      <td><code>${esc(m.key_fingerprint) || "–"}</code></td></tr>`).join("");
  }

  const drawn = {};
  function whenChanged(name, value, draw) {
    const key = JSON.stringify(value);
    if (drawn[name] === key) return;
    drawn[name] = key;
    draw();
  }

  function fleetPage() {
    follow((status) => {
      last = status;
      clockOffset = status.time - Date.now() / 1000;
      $("fleet-counts").textContent = `${status.counts.online} of ${status.counts.devices} devices online`;
      if (!status.broker_connected) { $("connection").textContent = "broker not connected"; $("connection").className = "pill bad"; }
      renderRound(status.current, status);
      renderDevices(status.devices);
      // Rounds and models change once a round, the snapshot up to once a second: redraw them only when they change.
      whenChanged("rounds", status.rounds, () => { renderRounds(status.rounds); drawCharts(status.rounds); });
      whenChanged("models", [status.models, status.key_fingerprint], () => renderModels(status.models, status.key_fingerprint));
      tickCountdown();
      if (api.renderedAt === null) api.renderedAt = performance.now();  // first full render, ms after navigation
    });
    setInterval(tickCountdown, 1000);
  }

  // ---- device page -----------------------------------------------------------------
  function devicePage() {
    const id = decodeURIComponent(location.pathname.split("/").pop());
    $("device-id").textContent = id;
    $("back").href = withToken("/");
    const load = () => fetch(withToken(`/api/devices/${encodeURIComponent(id)}`)).then((r) => r.ok ? r.json() : null).then((d) => {
      if (!d) { $("device-state").textContent = "not seen"; return; }
      $("device-state").textContent = d.state;
      $("device-state").className = `pill ${d.online ? "ok" : "bad"}`;
      const facts = [["Last seen", ago(d.last_seen)], ["Status detail", d.detail || "–"], ["Profile", d.profile || "–"],
        ["Model version", d.model_version == null ? "–" : "v" + d.model_version], ["Last round contributed", d.last_contributed ?? "–"],
        ["Training window", d.train_window || "–"], ["Last refusal", d.last_refusal || "–"]];
      $("device-facts").innerHTML = facts.map(([k, v]) => `<dt>${k}</dt><dd>${esc(v)}</dd>`).join("");
      $("device-events").tBodies[0].innerHTML = d.events.slice().reverse().map((e) => `<tr class="${e.accepted ? "accepted" : "refused"}">
        <td>${e.round}</td><td>${e.accepted ? "accepted" : "refused"}</td><td class="reason">${esc(e.reason) || "–"}</td>
        <td><code>${esc(e.transfer_id.slice(0, 8))}</code></td><td>${when(e.time)}</td></tr>`).join("");
      $("device-reported").innerHTML = d.reported_refusals.map((r) => `<li>${esc(r)}</li>`).join("") || '<li class="empty">none</li>';
      $("device-rounds").textContent = d.rounds_contributed.join(", ") || "none yet";
    });
    let pending = false;
    follow(() => { if (!pending) { pending = true; load().finally(() => { pending = false; }); } });
  }

  const api = {fleetPage, devicePage, charts, renderedAt: null};
  return api;
})();
