// racedit playground: one page, no build step, no CDN. It talks to the same routes as every client:
// GET /v1/models for the classes, POST /generate/stream for progress, previews and the result.
"use strict";

const $ = (id) => document.getElementById(id);
let apiKey = sessionStorage.getItem("racedit-api-key");
let card = null;

async function call(path, options = {}) {
  // Every route but the health probes and this page needs `Authorization: Bearer <key>` when the server has a key.
  for (;;) {
    const headers = { ...(options.headers || {}) };
    if (apiKey) headers.Authorization = `Bearer ${apiKey}`;
    const response = await fetch(path, { ...options, headers });
    if (response.status !== 401) return response;
    apiKey = window.prompt("This racedit server needs an API key:");
    if (!apiKey) throw new Error("an API key is required");
    sessionStorage.setItem("racedit-api-key", apiKey);
  }
}

// The page's state, for people (the button, the texts) and for scripts (body[data-state]):
// loading -> ready -> generating -> done | failed; a failed model card leaves it "failed".
function setState(state) {
  document.body.dataset.state = state;
  $("generate").disabled = state === "loading" || state === "generating" || !card;
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

function describe(detail) {
  if (Array.isArray(detail)) return detail.map((d) => `${(d.loc || []).slice(1).join(".") || "body"}: ${d.msg}`).join("\n");
  return typeof detail === "string" ? detail : JSON.stringify(detail);
}

async function loadModel() {
  const response = await call("v1/models");
  if (!response.ok) throw new Error(`GET /v1/models: ${response.status}`);
  card = (await response.json()).data[0];
  $("class").replaceChildren(...card.classes.map((name, index) => new Option(`${index}: ${name}`, index)));
  const routing = card.routing ? `${card.routing.routing}, ${card.routing.spec}` : "dense";
  const family = card.family && card.family !== "racedit" ? ` (${card.family})` : "";
  $("model-info").textContent = `${card.id}${family}: ${card.image_shape[1]}x${card.image_shape[2]}, ${routing}, ` +
    `${(card.parameters_activated / 1e6).toFixed(1)} M of ${(card.parameters_total / 1e6).toFixed(1)} M parameters active, ` +
    `${card.dtype}${card.batch_invariant ? ", batch-invariant" : ""}`;
  // The samplers this model's family serves, its default selected; its default steps and guidance.
  $("sampler").replaceChildren(...card.samplers.map((name) => new Option(name, name, false, name === card.default_sampler)));
  $("steps").value = card.default_num_steps;
  $("cfg").value = card.default_cfg_scale;
  const [low, high] = card.expert_budget_range;  // the dial's calibrated range (1.0 alone without a table)
  Object.assign($("budget"), { min: low, max: high });
  $("budget").disabled = low === high;
  $("model-info").removeAttribute("aria-busy");
  $("progress-text").textContent = "ready";
  setState("ready");
}

// A viridis-like colour map: the value's place between lo and hi -> [r, g, b].
const STOPS = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]];
function colour(value, lo, hi) {
  const x = hi > lo ? Math.min(1, Math.max(0, (value - lo) / (hi - lo))) * (STOPS.length - 1) : 0;
  const i = Math.min(STOPS.length - 2, Math.floor(x));
  const f = x - i;
  return STOPS[i].map((c, k) => Math.round(c + f * (STOPS[i + 1][k] - c)));
}

function heatmap(tokenMap, lo, hi) {
  // The (H/p) x (W/p) map drawn at its own size, then scaled up smoothly by the browser.
  const n = tokenMap.length;
  const small = document.createElement("canvas");
  small.width = small.height = n;
  const ctx = small.getContext("2d");
  const pixels = ctx.createImageData(n, n);
  tokenMap.forEach((row, y) => row.forEach((value, x) => {
    const [r, g, b] = colour(value, lo, hi);
    pixels.data.set([r, g, b, 255], 4 * (y * n + x));
  }));
  ctx.putImageData(pixels, 0, 0);
  const big = document.createElement("canvas");
  big.width = big.height = 192;
  big.className = "heatmap";
  const bctx = big.getContext("2d");
  bctx.imageSmoothingEnabled = true;
  bctx.drawImage(small, 0, 0, 192, 192);
  big.hidden = !$("heatmap-toggle").checked;
  return big;
}

function drawLegend(lo, hi) {
  const canvas = $("legend-bar");
  const ctx = canvas.getContext("2d");
  for (let x = 0; x < canvas.width; x++) {
    const [r, g, b] = colour(lo + (hi - lo) * x / (canvas.width - 1), lo, hi);
    ctx.fillStyle = `rgb(${r},${g},${b})`;
    ctx.fillRect(x, 0, 1, canvas.height);
  }
  $("legend-min").textContent = lo.toFixed(2);
  $("legend-max").textContent = `${hi.toFixed(2)} experts/token`;
  $("legend").hidden = !$("heatmap-toggle").checked;
}

function showImages(images, tokenMap) {
  const flat = tokenMap ? tokenMap.flat() : [];
  const lo = Math.min(...flat), hi = Math.max(...flat);
  $("images").replaceChildren(...images.map((image) => {
    const box = document.createElement("div");
    box.className = "sample";
    const img = document.createElement("img");
    img.src = `data:${image.mime_type};base64,${image.data}`;
    img.alt = `seed ${image.seed}`;
    box.append(img);
    if (tokenMap) box.append(heatmap(tokenMap, lo, hi));
    const caption = document.createElement("span");
    caption.className = "caption";
    caption.textContent = `seed ${image.seed}`;
    box.append(caption);
    return box;
  }));
  if (tokenMap) drawLegend(lo, hi);
}

function lineChart(canvas, ys, k) {
  const ctx = canvas.getContext("2d");
  const w = canvas.width, h = canvas.height, left = 40, right = 10, top = 10, bottom = 30;
  ctx.clearRect(0, 0, w, h);
  const hi = Math.max(k, ...ys) * 1.1, n = ys.length;
  const px = (i) => left + (n > 1 ? i / (n - 1) : 0) * (w - left - right);  // step i is at t = 1 - i / n
  const py = (v) => h - bottom - v / hi * (h - top - bottom);
  ctx.strokeStyle = "#999"; ctx.strokeRect(left, top, w - left - right, h - top - bottom);
  ctx.fillStyle = "#333"; ctx.font = "11px sans-serif";
  for (const v of [0, hi / 2, hi]) ctx.fillText(v.toFixed(1), 4, py(v) + 4);
  ctx.fillText("t = 1", left, h - 12); ctx.fillText("t = 0", w - right - 28, h - 12);
  ctx.setLineDash([4, 4]); ctx.beginPath(); ctx.moveTo(left, py(k)); ctx.lineTo(w - right, py(k)); ctx.stroke();
  ctx.setLineDash([]); ctx.strokeStyle = "#2f6fed"; ctx.lineWidth = 2; ctx.beginPath();
  ys.forEach((v, i) => (i ? ctx.lineTo(px(i), py(v)) : ctx.moveTo(px(i), py(v))));
  ctx.stroke(); ctx.lineWidth = 1;
}

function barChart(loads, title) {
  const canvas = document.createElement("canvas");
  canvas.width = 140; canvas.height = 80;
  const ctx = canvas.getContext("2d");
  const hi = Math.max(1, ...loads), bw = 130 / loads.length;
  ctx.fillStyle = "#333"; ctx.font = "10px sans-serif"; ctx.fillText(title, 2, 10);
  ctx.fillStyle = "#21918c";
  loads.forEach((v, e) => ctx.fillRect(5 + e * bw, 78 - v / hi * 62, bw - 2, v / hi * 62));
  return canvas;
}

function showUsage(usage) {
  $("charts").hidden = false;
  lineChart($("per-step-chart"), usage.per_step, usage.nominal_k);
  $("layer-charts").replaceChildren(...usage.per_layer.map((layer, i) =>
    barChart(layer.expert_load, `layer ${i}: ${layer.mean_experts_per_token.toFixed(2)} /token`)));
}

function parseEvents(buffer, onEvent) {
  // Server-sent events are separated by a blank line; returns what is left of an unfinished one.
  const blocks = buffer.split("\n\n");
  const rest = blocks.pop();
  for (const block of blocks) {
    let name = "message", data = "";
    for (const line of block.split("\n")) {
      if (line.startsWith("event:")) name = line.slice(6).trim();
      else if (line.startsWith("data:")) data += line.slice(5).trim();
    }
    if (data) onEvent(name, JSON.parse(data));
  }
  return rest;
}

function onEvent(name, data) {
  if (name === "progress") {
    const share = 100 * data.step / data.num_steps;
    $("progress-bar").style.width = `${share}%`;
    $("progress-text").textContent = `step ${data.step}/${data.num_steps}, t = ${data.t.toFixed(2)}, ` +
      `${data.mean_experts_per_token.toFixed(2)} experts per token so far, ${(data.elapsed_ms / 1000).toFixed(1)} s`;
  } else if (name === "preview") {
    showImages(data.images, null);
  } else if (name === "result") {
    $("progress-bar").style.width = "100%";
    $("progress-text").textContent = `done: ${data.request.num_images} x ${data.request.class_name}, ` +
      `cfg ${data.request.cfg_scale}, ${data.request.num_steps} ${data.request.sampler} steps, seed ${data.request.seed}; ` +
      `${data.expert_usage.mean_experts_per_token.toFixed(3)} experts per token (k = ${data.expert_usage.nominal_k})`;
    showImages(data.images, data.expert_usage.token_map);
    setState("done");
    showUsage(data.expert_usage);
    const t = data.timing;
    $("timing").textContent = `queue ${t.queue_ms.toFixed(0)} ms, inference ${t.inference_ms.toFixed(0)} ms, ` +
      `total ${t.total_ms.toFixed(0)} ms (request ${data.id})`;
  } else if (name === "error") {
    showError(`${data.status}: ${describe(data.detail)}`);
    $("progress-text").textContent = "failed";
    setState("failed");
  }
}

async function generate(event) {
  event.preventDefault();
  showError("");
  setState("generating");
  $("progress-bar").style.width = "0";
  $("progress-text").textContent = "queued";
  const body = {
    class_label: Number($("class").value), cfg_scale: Number($("cfg").value), num_steps: Number($("steps").value),
    num_images: Number($("num-images").value), preview_every: Number($("preview-every").value),
    expert_budget: Number($("budget").value), sampler: $("sampler").value,
  };
  if ($("seed").value !== "") body.seed = Number($("seed").value);
  try {
    const response = await call("generate/stream", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
    });
    if (!response.ok) {
      const answer = await response.json().catch(() => ({ detail: response.statusText }));
      throw new Error(`${response.status}: ${describe(answer.detail)}`);
    }
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer = parseEvents(buffer + decoder.decode(value, { stream: true }), onEvent);
    }
    if (document.body.dataset.state === "generating") throw new Error("the stream ended without a result");
  } catch (error) {
    showError(error.message);
    $("progress-text").textContent = "failed";
    setState("failed");
  }
}

$("heatmap-toggle").addEventListener("change", () => {
  document.querySelectorAll("canvas.heatmap").forEach((c) => { c.hidden = !$("heatmap-toggle").checked; });
  $("legend").hidden = !$("heatmap-toggle").checked || !document.querySelector("canvas.heatmap");
});
$("controls").addEventListener("submit", generate);
loadModel().catch((error) => {
  $("model-info").removeAttribute("aria-busy");
  $("model-info").textContent = "the model card could not be loaded";
  $("progress-text").textContent = "failed";
  showError(error.message);
  setState("failed");
});
