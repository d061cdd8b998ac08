// The playground: a plain client of the public API (POST /v1/txt2img, POST /v1/img2img as a form with
// the init image and the mask painted on a canvas over it, GET/DELETE /v1/jobs/{id},
// GET /v1/jobs/{id}/events). No build step, no dependency. The API key, when the server needs one,
// lives in localStorage. A job is followed through its event stream, read with fetch (EventSource
// cannot send the Authorization header), resumed with Last-Event-ID when the connection drops; where
// the stream cannot be had (an older server, a proxy that buffers it), by polling its status.
"use strict";

const KEY_STORAGE = "sdserve.apiKey";
const POLL_MS = 300;
const STREAM_FIRST_BYTE_MS = 3000; // the server writes at once: silence means a proxy holds the stream
const STREAM_RECONNECTS = 3;
const ENDED = new Set(["succeeded", "failed", "canceled"]);
const FIELDS = ["model", "prompt", "negative_prompt", "width", "height", "steps", "guidance_scale", "sampler", "scheduler", "seed", "num_images", "output_format"];
const NUMBER_FIELDS = new Set(["width", "height", "steps", "guidance_scale", "seed", "num_images"]);

const $ = (id) => document.getElementById(id);
const state = { job: null, timer: null, stream: null, supportsPreview: false, objectUrls: [], previewUrl: null, previewLoading: false };
// img2img: the chosen init image (a File) and whether the mask canvas holds anything
const image = { file: null, url: null, painted: false, drawing: false, last: null };
const IMAGE_TYPES = ["image/png", "image/jpeg", "image/webp"];

// --- HTTP ------------------------------------------------------------------------------------

function authHeaders() {
  const key = localStorage.getItem(KEY_STORAGE);
  return key ? { Authorization: `Bearer ${key}` } : {};
}

async function api(method, path, body) {
  const init = { method, headers: authHeaders() };
  if (body instanceof FormData) {
    init.body = body; // the browser writes the multipart Content-Type and its boundary
  } else if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch (error) {
    return { status: 0, data: { detail: `cannot reach the server: ${error.message}` } };
  }
  let data = null;
  try {
    data = await response.json();
  } catch (_) {
    data = { detail: `${response.status} ${response.statusText}` };
  }
  return { status: response.status, data, headers: response.headers };
}

async function fetchBlobUrl(path) {
  const response = await fetch(path, { headers: authHeaders() });
  if (!response.ok) throw new Error(`${response.status} ${response.statusText}`);
  const url = URL.createObjectURL(await response.blob());
  state.objectUrls.push(url);
  return url;
}

function detailText(data) {
  if (!data) return "unknown error";
  if (typeof data.detail === "string") return data.detail;
  if (Array.isArray(data.detail)) return data.detail.map((e) => `${fieldOf(e) || "request"}: ${e.msg}`).join("\n");
  if (data.error && data.error.message) return data.error.message;
  return JSON.stringify(data);
}

function fieldOf(error) {
  const loc = (error.loc || []).filter((part) => part !== "body");
  return loc.length ? String(loc[0]) : "";
}

// --- messages and field errors ----------------------------------------------------------------

function showMessage(text, kind = "error") {
  const box = $("message");
  box.textContent = text;
  box.className = `message ${kind}`;
  box.hidden = !text;
}

function clearFieldErrors() {
  for (const field of document.querySelectorAll(".field")) {
    field.classList.remove("invalid");
    field.querySelector(".error").textContent = "";
  }
}

function labelOf(error) {
  const name = fieldOf(error);
  const label = name && document.querySelector(`label[for="${name}"]`);
  return label ? label.firstChild.textContent.trim() : name || "the request";
}

function showFieldErrors(errors) {
  clearFieldErrors();
  const unplaced = [];
  for (const error of errors) {
    const field = document.querySelector(`.field[data-field="${fieldOf(error)}"]`);
    if (field) {
      field.classList.add("invalid");
      field.querySelector(".error").textContent = error.msg;
    } else {
      unplaced.push(`${fieldOf(error) || "request"}: ${error.msg}`);
    }
  }
  const names = [...new Set(errors.map(labelOf))].join(", ");
  showMessage(`Please fix: ${names}.` + (unplaced.length ? `\n${unplaced.join("\n")}` : ""));
  const first = document.querySelector(".field.invalid input, .field.invalid textarea");
  if (first) first.focus();
}

// --- API key ----------------------------------------------------------------------------------

function showKeyPanel(reason) {
  $("key-panel").hidden = false;
  $("api-key").value = localStorage.getItem(KEY_STORAGE) || "";
  if (reason) showMessage(reason);
  $("api-key").focus();
}

function saveKey() {
  const key = $("api-key").value.trim();
  if (key) localStorage.setItem(KEY_STORAGE, key);
  else localStorage.removeItem(KEY_STORAGE);
  showMessage("");
  loadModels();
}

function forgetKey() {
  localStorage.removeItem(KEY_STORAGE);
  $("api-key").value = "";
  showKeyPanel("API key forgotten.");
}

// --- server info: bounds from /openapi.json, model from /v1/models ----------------------------

async function loadHints() {
  const { status, data } = await api("GET", "/openapi.json");
  if (status !== 200) return;
  const schemas = (data.components || {}).schemas || {};
  const request = Object.values(schemas).find((s) => s.title === "Txt2ImgRequest") || schemas.Txt2ImgRequest;
  if (!request) return;
  const props = request.properties || {};
  state.supportsPreview = "preview" in props;
  $("preview").closest("label").hidden = !state.supportsPreview;
  for (const hint of document.querySelectorAll("[data-hint]")) {
    const prop = props[hint.dataset.hint];
    const bounds = prop && (prop.anyOf ? prop.anyOf.find((p) => p.type !== "null") : prop);
    if (bounds && bounds.minimum !== undefined && bounds.maximum !== undefined) {
      hint.textContent = `(${bounds.minimum}–${bounds.maximum})`;
    }
  }
}

async function loadModels() {
  const { status, data } = await api("GET", "/v1/models");
  const line = $("server-status");
  if (status === 401) {
    line.textContent = "API key needed";
    showKeyPanel(localStorage.getItem(KEY_STORAGE) ? "The saved API key was refused." : "");
    return;
  }
  if (status !== 200) {
    line.textContent = detailText(data);
    return;
  }
  $("key-panel").hidden = !localStorage.getItem(KEY_STORAGE);
  state.models = Object.fromEntries(data.data.map((m) => [m.id, m]));
  const select = $("model");
  const kept = select.value;
  while (select.options.length > 1) select.remove(1);
  for (const model of data.data) {
    const workers = `${model.workers} worker${model.workers === 1 ? "" : "s"}`;
    select.add(new Option(`${model.id} (${model.native_width}x${model.native_height}, ${workers})`, model.id));
  }
  // the one the server picks when none is named (SD_DEFAULT_MODEL, or the only one), else the first
  const preferred = data.data.find((m) => m.default) || data.data[0];
  select.value = kept in state.models ? kept : preferred ? preferred.id : "";
  select.options[0].hidden = Boolean(preferred);
  if (!preferred) {
    line.textContent = "no worker is running: no model is served now";
    return;
  }
  line.textContent = data.data.length === 1 ? `model ${preferred.id}` : `${data.data.length} models`;
  applyModel();
}

// The chosen model's defaults: size placeholders, steps, guidance and the sampler it recommends.
function applyModel() {
  const model = (state.models || {})[$("model").value];
  if (!model) return;
  $("width").placeholder = `${model.native_width} (default)`;
  $("height").placeholder = `${model.native_height} (default)`;
  $("steps").placeholder = `${model.default_steps} (default)`;
  $("guidance_scale").placeholder = `${model.default_guidance_scale} (default)`;
  state.defaultSampler = model.default_sampler;
  $("sampler").options[0].textContent = model.default_sampler ? `${model.default_sampler} (model default)` : "model default";
  for (const option of $("sampler").options) {
    if (option.value) option.disabled = Boolean(model.samplers && model.samplers.length) && !model.samplers.includes(option.value);
    if (option.disabled && option.selected) $("sampler").value = "";
  }
  restrictSchedulers();
}

// The samplers (GET /v1/samplers) in a select; the schedule select offers what the chosen one follows.
async function loadSamplers() {
  const { status, data } = await api("GET", "/v1/samplers");
  if (status !== 200) return;
  state.samplers = Object.fromEntries(data.samplers.map((s) => [s.name, s]));
  for (const sampler of data.samplers) {
    const option = new Option(`${sampler.label} (${sampler.name})`, sampler.name);
    option.title = sampler.description;
    $("sampler").add(option);
  }
  for (const scheduler of data.schedulers) {
    const option = new Option(scheduler.label, scheduler.name);
    option.title = scheduler.description;
    $("scheduler").add(option);
  }
  restrictSchedulers();
}

function restrictSchedulers() {
  const chosen = (state.samplers || {})[$("sampler").value || state.defaultSampler || "ddim"];
  for (const option of $("scheduler").options) {
    if (!option.value) continue;
    option.disabled = Boolean(chosen) && !chosen.schedulers.includes(option.value);
    if (option.disabled && option.selected) $("scheduler").value = "";
  }
}

// --- submit, follow, show -----------------------------------------------------------------------

function requestBody() {
  const body = {};
  for (const name of FIELDS) {
    const raw = $(name).value;
    if (raw.trim() === "" && name !== "prompt") continue;
    body[name] = NUMBER_FIELDS.has(name) ? Number(raw) : raw;
  }
  if (state.supportsPreview && $("preview").checked) body.preview = true;
  return body;
}

async function submit(event) {
  event.preventDefault();
  if (state.job) return;
  clearFieldErrors();
  showMessage("");
  const { status, data, headers } = image.file
    ? await api("POST", "/v1/img2img", await img2imgForm())
    : await api("POST", "/v1/txt2img", requestBody());
  if (status === 202) {
    startJob(data);
    return;
  }
  if (status === 422 && Array.isArray(data.detail)) showFieldErrors(data.detail);
  else if (status === 401) showKeyPanel(detailText(data));
  else if (status === 429) showMessage(`${detailText(data)} (retry after ${headers.get("Retry-After") || "a few"} s)`);
  else showMessage(detailText(data));
}

// --- img2img: the init image, the mask painted over it --------------------------------------------

// The POST /v1/img2img form: the txt2img fields (numbers as text: the server reads them as JSON), the
// strength, the init image file, and the mask painted (white on black, the image's size) if any.
async function img2imgForm() {
  const form = new FormData();
  for (const [name, value] of Object.entries(requestBody())) form.append(name, String(value));
  form.append("strength", $("strength").value);
  if ($("mask_blur").value.trim() !== "") form.append("mask_blur", $("mask_blur").value);
  form.append("init_image", image.file, image.file.name || "init.png");
  const mask = await maskBlob();
  if (mask) form.append("mask_image", mask, "mask.png");
  return form;
}

function maskBlob() {
  if (!image.painted) return Promise.resolve(null);
  const painted = $("mask-canvas");
  const out = document.createElement("canvas");
  out.width = painted.width;
  out.height = painted.height;
  const ctx = out.getContext("2d");
  ctx.fillStyle = "black";
  ctx.fillRect(0, 0, out.width, out.height);
  ctx.drawImage(painted, 0, 0);
  return new Promise((resolve) => out.toBlob(resolve, "image/png"));
}

function chooseImage(file) {
  if (!file) return;
  if (!IMAGE_TYPES.includes(file.type)) {
    showMessage(`${file.name}: choose a PNG, JPEG or WebP image`);
    return;
  }
  showMessage("");
  if (image.url) URL.revokeObjectURL(image.url);
  image.file = file;
  image.url = URL.createObjectURL(file);
  const preview = $("init-preview");
  preview.onload = () => {
    const canvas = $("mask-canvas");
    canvas.width = preview.naturalWidth; // the mask is drawn at the image's own size
    canvas.height = preview.naturalHeight;
    clearMask();
    $("width").placeholder = `${preview.naturalWidth - (preview.naturalWidth % 8)} (the image's)`;
    $("height").placeholder = `${preview.naturalHeight - (preview.naturalHeight % 8)} (the image's)`;
  };
  preview.src = image.url;
  $("paint").hidden = false;
  $("drop-hint").hidden = true;
  $("clear-image").hidden = false;
  $("image-panel").open = true;
}

function removeImage() {
  if (image.url) URL.revokeObjectURL(image.url);
  Object.assign(image, { file: null, url: null, painted: false });
  $("init_image").value = "";
  $("mask_image").value = "";
  $("paint").hidden = true;
  $("drop-hint").hidden = false;
  $("clear-image").hidden = true;
  applyModel(); // the size placeholders: the model's again
}

function clearMask() {
  const canvas = $("mask-canvas");
  canvas.getContext("2d").clearRect(0, 0, canvas.width, canvas.height);
  image.painted = false;
  $("mask_image").value = "";
}

// An uploaded mask shown on the canvas as painted strokes: its light pixels white, its dark ones clear.
function loadMask(file) {
  if (!file || !image.file) {
    if (file) showMessage("Choose the init image first, then its mask.");
    return;
  }
  const img = new Image();
  img.onload = () => {
    const canvas = $("mask-canvas");
    const ctx = canvas.getContext("2d");
    ctx.clearRect(0, 0, canvas.width, canvas.height);
    ctx.drawImage(img, 0, 0, canvas.width, canvas.height);
    const pixels = ctx.getImageData(0, 0, canvas.width, canvas.height);
    const d = pixels.data;
    for (let i = 0; i < d.length; i += 4) {
      const light = (d[i] + d[i + 1] + d[i + 2]) / 3 >= 128;
      d[i] = d[i + 1] = d[i + 2] = 255;
      d[i + 3] = light ? 255 : 0;
    }
    ctx.putImageData(pixels, 0, 0);
    image.painted = true;
    URL.revokeObjectURL(img.src);
  };
  img.src = URL.createObjectURL(file);
}

// The brush: white round strokes in the canvas' own pixels (the image's), whatever its size on screen.
function canvasPoint(event) {
  const canvas = $("mask-canvas");
  const box = canvas.getBoundingClientRect();
  return { x: ((event.clientX - box.left) * canvas.width) / box.width, y: ((event.clientY - box.top) * canvas.height) / box.height };
}

function paintTo(event) {
  const canvas = $("mask-canvas");
  const ctx = canvas.getContext("2d");
  const point = canvasPoint(event);
  const scale = canvas.width / canvas.getBoundingClientRect().width;
  ctx.strokeStyle = ctx.fillStyle = "white";
  ctx.lineWidth = Number($("brush").value) * scale;
  ctx.lineCap = ctx.lineJoin = "round";
  ctx.beginPath();
  const from = image.last || point;
  ctx.moveTo(from.x, from.y);
  ctx.lineTo(point.x, point.y);
  ctx.stroke();
  image.last = point;
  image.painted = true;
}

function wireImagePanel() {
  $("init_image").addEventListener("change", (e) => chooseImage(e.target.files[0]));
  $("mask_image").addEventListener("change", (e) => loadMask(e.target.files[0]));
  $("clear-image").addEventListener("click", removeImage);
  $("clear-mask").addEventListener("click", clearMask);
  const show = (id) => { $(`${id}-value`).textContent = id === "strength" ? Number($(id).value).toFixed(2) : $(id).value; };
  for (const id of ["strength", "brush"]) $(id).addEventListener("input", () => show(id));
  const zone = $("drop-zone");
  zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    zone.classList.remove("over");
    chooseImage(e.dataTransfer.files[0]);
  });
  const canvas = $("mask-canvas");
  canvas.addEventListener("pointerdown", (e) => {
    image.drawing = true;
    image.last = null;
    canvas.setPointerCapture(e.pointerId);
    paintTo(e);
  });
  canvas.addEventListener("pointermove", (e) => { if (image.drawing) paintTo(e); });
  const stop = () => { image.drawing = false; image.last = null; };
  canvas.addEventListener("pointerup", stop);
  canvas.addEventListener("pointercancel", stop);
}

function startJob(accepted) {
  clearResults();
  state.job = accepted.id;
  $("generate").disabled = true;
  $("cancel").hidden = false;
  $("cancel").disabled = false;
  $("status-box").hidden = false;
  $("empty").hidden = true;
  renderStatus({ status: accepted.status, queue_position: accepted.queue_position, progress: { step: 0, total_steps: 0 } });
  follow(accepted.id);
}

// The job's events until its end; polling takes over when the stream cannot be had.
async function follow(jobId) {
  const ended = await listen(jobId);
  if (!ended && jobId === state.job) poll();
}

// Reads GET /v1/jobs/{id}/events; true once the final event was handled (or the job was left),
// false when the stream is refused, silent, or keeps breaking.
async function listen(jobId) {
  let lastId = null;
  let failures = 0;
  while (failures <= STREAM_RECONNECTS) {
    if (jobId !== state.job) return true;
    let received = false;
    const controller = new AbortController();
    state.stream = controller;
    const headers = { ...authHeaders(), Accept: "text/event-stream" };
    if (lastId) headers["Last-Event-ID"] = lastId;
    const watchdog = setTimeout(() => controller.abort(), STREAM_FIRST_BYTE_MS);
    try {
      const response = await fetch(`/v1/jobs/${jobId}/events`, { headers, signal: controller.signal, cache: "no-store" });
      const type = response.headers.get("Content-Type") || "";
      if (!response.ok || !type.startsWith("text/event-stream")) return false;
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        clearTimeout(watchdog);
        if (done) break;
        received = true;
        buffer += value.replace(/\r\n?/g, "\n");
        let end;
        while ((end = buffer.indexOf("\n\n")) >= 0) {
          const event = parseEvent(buffer.slice(0, end));
          buffer = buffer.slice(end + 2);
          if (!event) continue;
          if (jobId !== state.job) {
            controller.abort();
            return true;
          }
          if (event.id) lastId = event.id;
          if (await handleEvent(event)) {
            controller.abort();
            return true;
          }
        }
      }
      // ended before the job did: the server closes long streams (SD_EVENTS_MAX_S), a proxy may cut
      // them; only one that brought nothing counts as a failure
      if (!received) failures++;
    } catch (_) {
      clearTimeout(watchdog);
      if (jobId !== state.job) return true;
      if (!received) return false; // not a byte: a proxy holds the stream, or none is served
      failures++;
    }
    await new Promise((resolve) => setTimeout(resolve, 500)); // then resume after the last event seen
  }
  return false;
}

// One event block ("id: ...", "event: ...", "data: ...", ": comment") to {id, name, data}, or null.
function parseEvent(block) {
  const event = { id: null, name: "message", data: "" };
  for (const line of block.split("\n")) {
    if (!line || line.startsWith(":")) continue;
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
    if (field === "id") event.id = value;
    else if (field === "event") event.name = value;
    else if (field === "data") event.data += (event.data ? "\n" : "") + value;
  }
  if (!event.data) return null;
  try {
    event.data = JSON.parse(event.data);
  } catch (_) {
    return null;
  }
  return event;
}

// true when the event ended the job (the stream is done).
async function handleEvent(event) {
  if (ENDED.has(event.name)) {
    await jobEnded(event.data);
    return true;
  }
  renderStatus(event.data);
  if (event.data.preview_url && event.data.status === "running") refreshPreview(event.data.preview_url);
  return false;
}

async function poll() {
  const jobId = state.job;
  if (!jobId) return;
  const { status, data } = await api("GET", `/v1/jobs/${jobId}`);
  if (jobId !== state.job) return;
  if (status !== 200) {
    finishJob();
    showMessage(detailText(data));
    return;
  }
  renderStatus(data);
  if (data.status === "queued" || data.status === "running") {
    if (data.preview_url && data.status === "running") refreshPreview(data.preview_url);
    state.timer = setTimeout(poll, POLL_MS);
    return;
  }
  await jobEnded(data);
}

async function jobEnded(data) {
  renderStatus(data);
  finishJob();
  if (data.status === "succeeded") await showImages(data);
  else if (data.status === "failed") showMessage(`The job failed: ${data.error ? `${data.error.type}: ${data.error.message}` : "no reason given"}`);
  else if (data.status === "canceled") showMessage(`Canceled at step ${data.progress.step} of ${data.progress.total_steps}.`, "info");
  if (data.status === "canceled" || data.status === "failed") {
    markPreview(`${data.status} at step ${data.progress.step} of ${data.progress.total_steps}`);
  }
}

// The last preview of a job that ended without images stays, labelled, so it is never taken for a result.
function markPreview(label) {
  if ($("preview-image").hidden) return;
  $("preview-image").classList.add("stopped");
  $("preview-label").textContent = label;
  $("preview-label").hidden = false;
}

function unmarkPreview() {
  $("preview-image").classList.remove("stopped");
  $("preview-label").hidden = true;
}

// The job's warnings (e.g. prompt words the model does not know), under the picture, as soon as known.
function renderWarnings(warnings) {
  const items = (warnings || []).map((text) => {
    const item = document.createElement("li");
    item.textContent = text;
    return item;
  });
  $("warnings").replaceChildren(...items);
  $("warnings").hidden = !items.length;
}

function renderStatus(job) {
  const progress = job.progress || { step: 0, total_steps: 0 };
  const total = progress.total_steps || 0;
  const percent = total ? Math.round((100 * progress.step) / total) : 0;
  let text;
  if (job.status === "queued") {
    const ahead = job.queue_position;
    text = ahead === 0 ? "Queued: next in line" : ahead == null ? "Queued" : `Queued: ${ahead} job(s) ahead`;
  } else if (job.status === "running") {
    text = `Running: step ${progress.step} of ${total}` + (job.cancel_requested ? " (canceling…)" : "");
  } else if (job.status === "succeeded") {
    text = `Done: ${total} steps`;
  } else {
    text = job.status.charAt(0).toUpperCase() + job.status.slice(1);
  }
  $("status-text").textContent = text;
  renderWarnings(job.warnings);
  const shown = job.status === "succeeded" ? 100 : job.status === "running" ? percent : 0;
  $("bar-fill").style.width = `${shown}%`;
  $("bar").setAttribute("aria-valuenow", String(shown));
  $("bar").classList.toggle("waiting", job.status === "queued");
}

async function refreshPreview(path) {
  if (state.previewLoading) return; // events can come faster than previews load: skip, never pile up
  state.previewLoading = true;
  const jobId = state.job;
  try {
    const url = await fetchBlobUrl(`${path}?t=${Date.now()}`);
    if (jobId !== state.job) return; // the job ended meanwhile: its images replace the preview
    if (state.previewUrl) URL.revokeObjectURL(state.previewUrl);
    state.previewUrl = url;
    $("preview-image").src = url;
    $("preview-image").hidden = false;
  } catch (_) {
    // no preview yet (first step not done): keep the previous one
  } finally {
    state.previewLoading = false;
  }
}

async function showImages(job) {
  $("preview-image").hidden = true;
  unmarkPreview();
  const results = $("results");
  for (const image of job.images) {
    const card = document.createElement("figure");
    card.className = "card";
    const img = document.createElement("img");
    img.className = "result";
    img.alt = `image ${image.index + 1}, seed ${image.seed}`;
    const caption = document.createElement("figcaption");
    const seed = document.createElement("span");
    seed.className = "seed";
    seed.textContent = `seed ${image.seed}`;
    const download = document.createElement("a");
    download.className = "download";
    download.textContent = "Download";
    download.download = `sdserve-${image.seed}.${image.url.split(".").pop()}`;
    const reuse = document.createElement("button");
    reuse.type = "button";
    reuse.className = "reuse";
    reuse.textContent = "Reuse seed";
    reuse.addEventListener("click", () => reuseSeed(image.seed));
    caption.append(seed, download, reuse);
    card.append(img, caption);
    results.append(card);
    try {
      const url = await fetchBlobUrl(image.url);
      img.src = url;
      download.href = url;
    } catch (error) {
      caption.textContent = `image ${image.index}: ${error.message}`;
    }
  }
}

function reuseSeed(seed) {
  $("seed").value = String(seed);
  $("num_images").value = "1";
  showMessage(`Seed ${seed} set: Generate makes that image again.`, "info");
  $("seed").focus();
}

async function cancel() {
  if (!state.job) return;
  $("cancel").disabled = true;
  const { status, data } = await api("DELETE", `/v1/jobs/${state.job}`);
  if (status !== 200 && status !== 202) showMessage(detailText(data));
}

function finishJob() {
  clearTimeout(state.timer);
  if (state.stream) state.stream.abort();
  state.stream = null;
  state.job = null;
  $("generate").disabled = false;
  $("cancel").hidden = true;
}

function clearResults() {
  for (const url of state.objectUrls) URL.revokeObjectURL(url);
  state.objectUrls = [];
  state.previewUrl = null;
  $("results").replaceChildren();
  $("preview-image").hidden = true;
  $("preview-image").removeAttribute("src");
  unmarkPreview();
  renderWarnings([]);
}

// --- wiring -------------------------------------------------------------------------------------

document.addEventListener("DOMContentLoaded", () => {
  $("generate-form").addEventListener("submit", submit);
  $("cancel").addEventListener("click", cancel);
  $("save-key").addEventListener("click", saveKey);
  $("api-key").addEventListener("keydown", (e) => { if (e.key === "Enter") { e.preventDefault(); saveKey(); } });
  $("forget-key").addEventListener("click", forgetKey);
  $("random-seed").addEventListener("click", () => { $("seed").value = ""; });
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) $("generate-form").requestSubmit();
  });
  $("sampler").addEventListener("change", restrictSchedulers);
  $("model").addEventListener("change", applyModel);
  wireImagePanel();
  loadHints();
  loadSamplers().then(loadModels);
});
