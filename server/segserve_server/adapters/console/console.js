// segserve's browser console (docs/console.md): the model list, segmenting a dropped image, and
// live request rates and latency from the server's own metrics. Plain ES modules (this one,
// common.js, png.js, live.js), no build step, no dependencies; they talk only to the same
// origin's /v1 and /v2 routes.
//
// Query parameters: `model` (preselected), `stats_ms` (the stats poll, default 2000),
// `models_ms` (the model list refresh, default 5000).
//
// Completed actions are counted in data attributes (data-answers on #segment-panel, data-polls on
// #live-panel, data-refreshes on #models-panel) so that scripts and tests can wait for them.

import {
  $,
  ApiError,
  TOKEN_KEY,
  api,
  bump,
  clock,
  element,
  formatDuration,
  rgb,
} from "./common.js";
import { SPARK_POINTS, livePanel } from "./live.js";
import { base64Bytes, decodePng } from "./png.js";

const params = new URLSearchParams(location.search);
const STATS_INTERVAL_MS = Math.max(100, Number(params.get("stats_ms")) || 2000);
const MODELS_INTERVAL_MS = Math.max(100, Number(params.get("models_ms")) || 5000);
const STAGES = ["decode", "preprocess", "queue", "infer", "postprocess", "encode", "total"];
const FALLBACK_COLOUR = [255, 0, 255]; // a class id the answer has no colour for

const state = {
  models: [], // GET /v1/models' entries
  last: null, // {answer, labels, image, confidence} of the answer shown
  sequence: 0, // the latest segment request; older answers are dropped
  serverName: undefined, // "name version" from GET /v2; null where it has none
  uptimeS: undefined,
};

// --- Status line (failed polls) ---------------------------------------------------------------

const pollErrors = new Map();

function setPollError(source, error) {
  if (error) pollErrors.set(source, `${source}: ${error.describe ? error.describe() : error}`);
  else pollErrors.delete(source);
  const status = $("status");
  status.textContent = [...pollErrors.values()].join(" · ");
  status.hidden = pollErrors.size === 0;
}

// --- Server info and models -------------------------------------------------------------------

/** The header: the server's name and version (KServe's GET /v2), host and uptime. */
async function refreshServerInfo(uptimeS) {
  if (state.serverName === undefined) {
    state.serverName = null;
    try {
      const meta = await (await api("/v2")).json();
      if (meta.name) state.serverName = `${meta.name}${meta.version ? " " + meta.version : ""}`;
    } catch (err) {
      // Asked again next time where the token may be missing yet or the server was not reached.
      if ([0, 401, 403].includes(err.status)) state.serverName = undefined;
    }
  }
  if (uptimeS !== undefined) state.uptimeS = uptimeS;
  const parts = [state.serverName, location.host];
  if (state.uptimeS !== undefined) parts.push(`up ${formatDuration(state.uptimeS)}`);
  $("server-info").textContent = parts.filter(Boolean).join(" · ");
}

function versionsCell(model) {
  const cell = element("td");
  (model.versions || []).forEach((version, i) => {
    if (i) cell.append(", ");
    cell.append(
      version === model.serving_version
        ? element("strong", { title: "serving" }, String(version))
        : String(version),
    );
  });
  if (!cell.childNodes.length) cell.append("—");
  return cell;
}

function renderModels() {
  const body = $("models").tBodies[0];
  body.replaceChildren(
    ...state.models.map((model) =>
      element(
        "tr",
        { "data-model": model.name, "data-state": model.state },
        element("td", model.description ? { title: model.description } : {}, model.name),
        element(
          "td",
          {},
          element("span", { class: `badge ${String(model.state).toLowerCase()}` }, model.state),
          model.reason ? element("div", { class: "reason" }, model.reason) : null,
        ),
        versionsCell(model),
        element("td", {}, model.input_width ? `${model.input_width}×${model.input_height}` : "—"),
        element("td", {}, String((model.classes || []).length)),
        element("td", {}, model.has_confidence ? "yes" : "no"),
        element("td", {}, [model.backend, model.pipeline].filter(Boolean).join(" / ") || "—"),
      ),
    ),
  );
  const select = $("model");
  const chosen = select.value || params.get("model");
  select.replaceChildren(
    ...state.models.map((model) =>
      element(
        "option",
        model.state === "READY" ? { value: model.name } : { value: model.name, disabled: "" },
        model.state === "READY" ? model.name : `${model.name} (${model.state.toLowerCase()})`,
      ),
    ),
  );
  const ready = state.models.filter((model) => model.state === "READY");
  const keep = ready.find((model) => model.name === chosen) || ready[0];
  if (keep) select.value = keep.name;
  updateConfidenceToggle();
}

async function refreshModels() {
  try {
    state.models = (await (await api("/v1/models")).json()).models || [];
    renderModels();
    $("models-updated").textContent = `updated ${clock()}`;
    setPollError("models", null);
  } catch (err) {
    setPollError("models", err);
  }
  bump($("models-panel"), "refreshes");
}

function currentModel() {
  return state.models.find((model) => model.name === $("model").value) || null;
}

function updateConfidenceToggle() {
  const model = currentModel();
  $("confidence-toggle").hidden = !(model && model.has_confidence);
  showConfidence();
}

// --- Segmenting -------------------------------------------------------------------------------

function showError(err) {
  const box = $("error");
  box.replaceChildren(
    element("strong", {}, err instanceof ApiError ? err.describe() : `Error: ${err.message || err}`),
  );
  box.hidden = false;
}

async function segment(file) {
  const panel = $("segment-panel");
  const sequence = ++state.sequence;
  $("error").hidden = true;
  const model = currentModel();
  if (!model) {
    showError(new Error("no model is READY to segment with"));
    bump(panel, "answers");
    return;
  }
  panel.classList.add("busy");
  const query = new URLSearchParams({
    format: "json",
    encodings: "png",
    pixel_counts: "true",
    confidence: model.has_confidence ? "true" : "false",
  });
  const started = performance.now();
  try {
    const response = await api(`/v1/models/${encodeURIComponent(model.name)}/segment?${query}`, {
      method: "POST",
      body: file,
      headers: { "Content-Type": file.type || "application/octet-stream" },
    });
    const answer = await response.json();
    const roundTripMs = performance.now() - started;
    const png = (answer.masks || []).find((mask) => mask.encoding === "png");
    if (!png) throw new Error("the answer has no PNG mask");
    const labels = await decodePng(base64Bytes(png.data_base64));
    const confidence = answer.confidence?.png_base64
      ? await decodePng(base64Bytes(answer.confidence.png_base64))
      : null;
    // Where the browser cannot draw an image the server decoded, the mask stands alone.
    const image = await createImageBitmap(file).catch(() => null);
    if (sequence !== state.sequence) return; // a newer drop has replaced this one
    state.last = { answer, labels, image, confidence, roundTripMs, name: file.name || "image" };
    renderAnswer();
  } catch (err) {
    if (sequence === state.sequence) {
      $("result").hidden = true;
      showError(err);
    }
  } finally {
    if (sequence === state.sequence) panel.classList.remove("busy");
    bump(panel, "answers");
  }
}

function renderAnswer() {
  const { answer, labels, confidence, roundTripMs, name } = state.last;
  drawOverlay();
  $("overlay-caption").textContent =
    `${name}: ${answer.width}×${answer.height}, ${answer.model} v${answer.model_version}`;
  const confidenceCanvas = $("confidence");
  if (confidence) {
    drawConfidence(confidenceCanvas, confidence);
    const mean = answer.confidence.mean;
    $("confidence-caption").textContent =
      `confidence (brighter is surer)${mean === undefined ? "" : `, mean ${(100 * mean).toFixed(1)} %`}`;
  }
  confidenceCanvas.dataset.present = confidence ? "true" : "false";
  showConfidence();
  renderShares(answer, labels);
  renderTimings(answer.timings_ms || {}, roundTripMs);
  $("result").hidden = false;
}

function showConfidence() {
  const present = $("confidence").dataset.present === "true";
  $("confidence-figure").hidden =
    !present || $("confidence-toggle").hidden || !$("show-confidence").checked;
}

/** The image with the class colours blended over it at the slider's opacity. */
function drawOverlay() {
  const { answer, labels, image } = state.last;
  const canvas = $("overlay");
  const [width, height] = [labels.width, labels.height];
  canvas.width = width;
  canvas.height = height;
  const context = canvas.getContext("2d", { willReadFrequently: true });
  context.fillStyle = "#202020";
  context.fillRect(0, 0, width, height);
  if (image) context.drawImage(image, 0, 0, width, height);
  const frame = context.getImageData(0, 0, width, height);
  const alpha = Number($("opacity").value);
  const colours = answer.colors || [];
  const data = frame.data;
  for (let i = 0; i < labels.pixels.length; i++) {
    const colour = colours[labels.pixels[i]] || FALLBACK_COLOUR;
    const j = 4 * i;
    data[j] = Math.round(data[j] * (1 - alpha) + colour[0] * alpha);
    data[j + 1] = Math.round(data[j + 1] * (1 - alpha) + colour[1] * alpha);
    data[j + 2] = Math.round(data[j + 2] * (1 - alpha) + colour[2] * alpha);
    data[j + 3] = 255;
  }
  context.putImageData(frame, 0, 0);
}

// Dark red (unsure) through orange to pale yellow (sure).
const RAMP = [
  [0, [40, 0, 60]],
  [0.5, [200, 40, 40]],
  [0.8, [250, 160, 30]],
  [1, [255, 250, 200]],
];

function rampColour(value) {
  for (let i = 1; i < RAMP.length; i++) {
    const [stop, colour] = RAMP[i];
    if (value <= stop) {
      const [previousStop, previous] = RAMP[i - 1];
      const t = (value - previousStop) / (stop - previousStop);
      return previous.map((channel, k) => Math.round(channel + t * (colour[k] - channel)));
    }
  }
  return RAMP[RAMP.length - 1][1];
}

function drawConfidence(canvas, confidence) {
  canvas.width = confidence.width;
  canvas.height = confidence.height;
  const context = canvas.getContext("2d", { willReadFrequently: true });
  const frame = context.createImageData(confidence.width, confidence.height);
  const table = Array.from({ length: 256 }, (_, v) => rampColour(v / 255));
  for (let i = 0; i < confidence.pixels.length; i++) {
    const colour = table[confidence.pixels[i]];
    frame.data.set([colour[0], colour[1], colour[2], 255], 4 * i);
  }
  context.putImageData(frame, 0, 0);
}

function renderShares(answer, labels) {
  const counts = answer.pixel_counts || [];
  const total = counts.reduce((sum, count) => sum + count, 0) || labels.pixels.length;
  const rows = counts
    .map((count, id) => ({ id, count }))
    .filter((row) => row.count > 0)
    .sort((a, b) => b.count - a.count || a.id - b.id);
  $("shares").tBodies[0].replaceChildren(
    ...rows.map(({ id, count }) =>
      element(
        "tr",
        { "data-class-id": String(id), "data-pixels": String(count) },
        element(
          "td",
          {},
          element("span", {
            class: "swatch",
            style: { background: rgb((answer.colors || [])[id] || FALLBACK_COLOUR) },
          }),
        ),
        element("td", { class: "num" }, String(id)),
        element("td", {}, (answer.classes || [])[id] ?? `class ${id}`),
        element("td", { class: "num" }, count.toLocaleString("en")),
        element("td", { class: "num" }, `${((100 * count) / total).toFixed(2)} %`),
      ),
    ),
  );
}

function renderTimings(timings, roundTripMs) {
  const rows = STAGES.filter((stage) => timings[stage] !== undefined).map((stage) =>
    element(
      "tr",
      { "data-stage": stage, class: stage === "total" ? "total" : "" },
      element("td", {}, stage),
      element("td", { class: "num" }, Number(timings[stage]).toFixed(2)),
    ),
  );
  rows.push(
    element(
      "tr",
      { "data-stage": "round_trip" },
      element("td", {}, "round trip (browser)"),
      element("td", { class: "num" }, roundTripMs.toFixed(1)),
    ),
  );
  $("timings").tBodies[0].replaceChildren(...rows);
}

// --- Wiring -----------------------------------------------------------------------------------

function every(intervalMs, task) {
  const run = async () => {
    await task();
    setTimeout(run, intervalMs);
  };
  run();
}

function wire() {
  const token = $("token");
  token.value = sessionStorage.getItem(TOKEN_KEY) || "";
  token.addEventListener("change", () => {
    if (token.value) sessionStorage.setItem(TOKEN_KEY, token.value.trim());
    else sessionStorage.removeItem(TOKEN_KEY);
    refreshModels();
    refreshServerInfo();
  });

  $("model").addEventListener("change", updateConfidenceToggle);
  $("show-confidence").addEventListener("change", showConfidence);
  $("opacity").addEventListener("input", () => {
    $("opacity-value").textContent = Number($("opacity").value).toFixed(2);
    if (state.last) drawOverlay();
  });

  const file = $("file");
  file.addEventListener("change", () => {
    if (file.files.length) segment(file.files[0]);
    file.value = "";
  });
  const zone = $("drop-zone");
  zone.addEventListener("keydown", (event) => {
    if (event.key === "Enter" || event.key === " ") file.click();
  });
  // A file dropped outside the zone would make the browser leave the page.
  for (const type of ["dragover", "drop"]) {
    window.addEventListener(type, (event) => event.preventDefault());
  }
  zone.addEventListener("dragover", (event) => {
    event.preventDefault();
    zone.classList.add("over");
  });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("over");
    const dropped = event.dataTransfer?.files?.[0];
    if (dropped) segment(dropped);
    else showError(new Error("drop an image file"));
  });

  const span = (SPARK_POINTS * STATS_INTERVAL_MS) / 1000;
  $("spark-span").textContent = span >= 120 ? `${Math.round(span / 60)} min` : `${span} s`;
  refreshServerInfo();
  every(MODELS_INTERVAL_MS, refreshModels);
  every(
    STATS_INTERVAL_MS,
    livePanel({
      intervalMs: STATS_INTERVAL_MS,
      onUptime: refreshServerInfo,
      onError: (err) => setPollError("stats", err),
    }),
  );
}

wire();
