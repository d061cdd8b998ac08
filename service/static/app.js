// The playground: a plain client of the public API (POST /v1/txt2img, GET/DELETE /v1/jobs/{id}).
// No build step, no dependency. The API key, when the server needs one, lives in localStorage.
"use strict";

const KEY_STORAGE = "sdserve.apiKey";
const POLL_MS = 300;
const FIELDS = ["prompt", "negative_prompt", "width", "height", "steps", "guidance_scale", "sampler", "scheduler", "seed", "num_images"];
const NUMBER_FIELDS = new Set(["width", "height", "steps", "guidance_scale", "seed", "num_images"]);

const $ = (id) => document.getElementById(id);
const state = { job: null, timer: null, supportsPreview: false, objectUrls: [], previewUrl: null };

// --- HTTP ------------------------------------------------------------------------------------

function authHeaders() {
  const key = localStorage.getItem(KEY_STORAGE);
  return key ? { Authorization: `Bearer ${key}` } : {};
}

async function api(method, path, body) {
  const init = { method, headers: authHeaders() };
  if (body !== undefined) {
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
  const model = data.data[0];
  if (!model) {
    line.textContent = "no worker is running: jobs wait in the queue";
    return;
  }
  line.textContent = `model ${model.id}`;
  $("width").placeholder = `${model.native_width} (default)`;
  $("height").placeholder = `${model.native_height} (default)`;
  $("steps").placeholder = `${model.default_steps} (default)`;
  $("guidance_scale").placeholder = `${model.default_guidance_scale} (default)`;
  state.defaultSampler = model.default_sampler;
  if (model.default_sampler) $("sampler").options[0].textContent = `${model.default_sampler} (model default)`;
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
  const { status, data, headers } = await api("POST", "/v1/txt2img", requestBody());
  if (status === 202) {
    startJob(data);
    return;
  }
  if (status === 422 && Array.isArray(data.detail)) showFieldErrors(data.detail);
  else if (status === 401) showKeyPanel(detailText(data));
  else if (status === 429) showMessage(`${detailText(data)} (retry after ${headers.get("Retry-After") || "a few"} s)`);
  else showMessage(detailText(data));
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
  poll();
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
  finishJob();
  if (data.status === "succeeded") await showImages(data);
  else if (data.status === "failed") showMessage(`The job failed: ${data.error ? `${data.error.type}: ${data.error.message}` : "no reason given"}`);
  else if (data.status === "canceled") showMessage(`Canceled at step ${data.progress.step} of ${data.progress.total_steps}.`, "info");
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
  const shown = job.status === "succeeded" ? 100 : job.status === "running" ? percent : 0;
  $("bar-fill").style.width = `${shown}%`;
  $("bar").setAttribute("aria-valuenow", String(shown));
  $("bar").classList.toggle("waiting", job.status === "queued");
}

async function refreshPreview(path) {
  try {
    const url = await fetchBlobUrl(`${path}?t=${Date.now()}`);
    if (state.previewUrl) URL.revokeObjectURL(state.previewUrl);
    state.previewUrl = url;
    $("preview-image").src = url;
    $("preview-image").hidden = false;
  } catch (_) {
    // no preview yet (first step not done): keep the previous one
  }
}

async function showImages(job) {
  $("preview-image").hidden = true;
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
    download.download = `sdserve-${image.seed}.png`;
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
  loadHints();
  loadSamplers().then(loadModels);
});
