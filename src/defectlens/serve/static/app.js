// The defectlens dashboard: no framework, no build step, nothing loaded from elsewhere.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { model: null, card: null, rows: [], after: 0, threshold: null, key: null };

function setStatus(text) { $("status").textContent = text || ""; }

async function api(path, options = {}) {
  const headers = Object.assign({}, options.headers || {});
  if (state.key) headers["X-API-Key"] = state.key;
  const response = await fetch(path, Object.assign({}, options, { headers }));
  if (response.status === 401) {
    $("key-form").hidden = false;
    throw new Error("this service needs an API key: enter it above");
  }
  const body = await response.json().catch(() => ({}));
  if (!response.ok) {
    const message = body.error ? body.error.message : `HTTP ${response.status}`;
    throw new Error(message);
  }
  return body;
}

function format(x) {
  if (x === null || x === undefined) return "–";
  if (typeof x !== "number") return String(x);
  return Math.abs(x) >= 1000 || (Math.abs(x) < 0.01 && x !== 0) ? x.toExponential(3) : x.toFixed(3);
}

async function loadModels() {
  const { models } = await api("/v1/models");
  const select = $("model");
  select.replaceChildren(...models.map((m) => new Option(`${m.name} (${m.method})`, m.name)));
  state.cards = Object.fromEntries(models.map((m) => [m.name, m]));
  chooseModel(models[0].name);
}

function chooseModel(name) {
  state.model = name;
  state.card = state.cards[name];
  state.rows = [];
  state.after = 0;
  state.threshold = state.card.thresholds.image;
  $("model").value = name;
  showCard();
  $("recent-list").replaceChildren();
  poll();
}

function showCard() {
  const c = state.card;
  const t = c.thresholds;
  const items = [
    ["method", c.method], ["backbone", c.backbone], ["kind", c.kind],
    ["image size", `${c.image_size} px`], ["image threshold", format(t.image)],
    ["target false-alarm rate", t.manual ? "none: threshold set by hand" : t.target_far],
    ["validation images", c.validation_images],
    ["training images", c.training_images ?? "–"], ["learned from", c.supervision],
    ["drift", c.drift && c.drift.drift !== null ? format(c.drift.drift) : "–"],
  ];
  if (c.metrics) {
    for (const k of ["image_auroc", "pixel_auroc", "aupro"]) {
      if (c.metrics[k] !== undefined) items.push([k.replace("_", " "), format(c.metrics[k])]);
    }
  }
  $("card").replaceChildren(...items.flatMap(([k, v]) => {
    const dt = document.createElement("dt"); dt.textContent = k;
    const dd = document.createElement("dd"); dd.textContent = String(v);
    return [dt, dd];
  }));
}

async function upload(files) {
  if (!files.length) return;
  const form = new FormData();
  for (const f of files) form.append("images", f, f.name);
  setStatus(`scoring ${files.length} image(s)…`);
  try {
    const body = await api(
      `/v1/models/${encodeURIComponent(state.model)}/predict?outputs=overlay`,
      { method: "POST", body: form },
    );
    const last = body.results[body.results.length - 1];
    const overlay = last.outputs && last.outputs.overlay;  // none from a model without maps
    $("overlay").hidden = !overlay;
    if (overlay) $("overlay").src = overlay;
    $("overlay").alt = overlay ? `anomaly overlay of ${last.filename}` : "";
    $("result-name").textContent = last.filename;
    const badge = $("result-decision");
    badge.textContent = last.decision;
    badge.className = `badge ${last.decision}`;
    $("result-score").textContent = format(last.score);
    $("result-threshold").textContent = format(last.threshold);
    const n = last.boxes.length;
    $("result-regions").textContent = n ? `${n} defect region(s)` : "no defect region";
    $("result").hidden = false;
    setStatus("");
  } catch (error) {
    setStatus(`could not score: ${error.message}`);
  }
  poll();
}

async function poll() {
  if (!state.model) return;
  try {
    const path = `/v1/recent?model=${encodeURIComponent(state.model)}&after=${state.after}`;
    const { results } = await api(path);
    if (results.length) {
      state.after = results[results.length - 1].id;
      state.rows = state.rows.concat(results).slice(-500);
      renderRows();
      drawHistogram();
      state.card = await api(`/v1/models/${encodeURIComponent(state.model)}`);
      showCard();  // its drift signal moves with the new results
    }
  } catch (error) {
    setStatus(error.message);
  }
}

function renderRows() {
  const filter = document.querySelector("input[name=filter]:checked").value;
  const rows = state.rows.filter((r) => filter === "all" || r.decision === filter);
  $("recent-list").replaceChildren(...rows.slice().reverse().map((r) => {
    const tr = document.createElement("tr");
    const time = new Date(r.time * 1000).toLocaleTimeString();
    const cells = [time, r.filename, r.score === null ? r.error : format(r.score), r.decision];
    cells.forEach((text, i) => {
      const td = document.createElement("td");
      td.textContent = text;
      if (i === 3) td.className = `badge ${r.decision}`;
      tr.append(td);
    });
    return tr;
  }));
}

function scores() { return state.rows.filter((r) => r.score !== null).map((r) => r.score); }

function drawHistogram() {
  const values = scores();
  const canvas = $("histogram");
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  const model = state.card.thresholds.image;
  const lo = Math.min(model, ...values), hi = Math.max(model, ...values);
  const span = hi - lo || Math.abs(hi) || 1;
  const min = lo - 0.05 * span, max = hi + 0.05 * span;
  const slider = $("threshold-slider");
  slider.min = min; slider.max = max; slider.step = (max - min) / 500;
  slider.value = state.threshold;
  const x = (v) => ((v - min) / (max - min)) * canvas.width;
  $("axis-min").textContent = format(min);
  $("axis-max").textContent = format(max);
  const bins = new Array(40).fill(0);
  for (const v of values) bins[Math.min(39, Math.floor(((v - min) / (max - min)) * 40))] += 1;
  const top = Math.max(1, ...bins);
  const w = canvas.width / 40;
  bins.forEach((n, i) => {
    const centre = min + ((i + 0.5) / 40) * (max - min);
    ctx.fillStyle = centre > state.threshold ? "#b3261e" : "#1e7b3a";
    const h = (n / top) * (canvas.height - 20);
    ctx.fillRect(i * w + 1, canvas.height - h, w - 2, h);
  });
  for (const [value, colour, dash] of [[model, "#1f3a5f", []], [state.threshold, "#f5a623", [6, 4]]]) {
    ctx.strokeStyle = colour; ctx.lineWidth = 2; ctx.setLineDash(dash);
    ctx.beginPath(); ctx.moveTo(x(value), 0); ctx.lineTo(x(value), canvas.height); ctx.stroke();
  }
  ctx.setLineDash([]);
  updateWhatIf();
}

function updateWhatIf() {
  const values = scores();
  const model = state.card.thresholds.image;
  const flagged = values.filter((v) => v > state.threshold).length;
  const flips = values.filter((v) => (v > state.threshold) !== (v > model)).length;
  $("flagged-count").textContent = flagged;
  $("recent-count").textContent = values.length;
  $("flip-count").textContent = flips;
  $("slider-value").textContent = format(state.threshold);
  $("apply-value").textContent = String(Number(state.threshold.toPrecision(6)));
}

function setup() {
  $("model").addEventListener("change", (e) => chooseModel(e.target.value));
  $("file").addEventListener("change", (e) => upload([...e.target.files]));
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    upload([...e.dataTransfer.files]);
  });
  $("threshold-slider").addEventListener("input", (e) => {
    state.threshold = Number(e.target.value);
    drawHistogram();
  });
  $("reset-threshold").addEventListener("click", () => {
    state.threshold = state.card.thresholds.image;
    drawHistogram();
  });
  document.querySelectorAll("input[name=filter]").forEach((r) => r.addEventListener("change", renderRows));
  $("key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    state.key = $("api-key").value;
    sessionStorage.setItem("defectlens-key", state.key);
    start();
  });
  state.key = sessionStorage.getItem("defectlens-key");
  start();
  setInterval(poll, 2000);
}

async function start() {
  try {
    await loadModels();
    setStatus("");
  } catch (error) {
    setStatus(`cannot reach the service: ${error.message}`);
  }
}

setup();
