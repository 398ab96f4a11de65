// raysys viewer: send DICOM slices to this Serve app, show its windows, probabilities and heat maps.
//
// The page never reads a DICOM header and never shows or sends the user's file names (they often hold a
// patient's name): it shows only what the API answers, the SOPInstanceUID (image_id) among it.
//
//   one file      POST v1/explain?labels=SUBTYPE (raw body)  -> windows, probabilities, the subtype's heat map
//   several files POST v1/predict (multipart, one request: a sequence checkpoint reads them as series)
//                 -> per-slice probabilities in slice order; v1/explain for the selected slice, lazily, cached:
//                 the slice's file alone, or for a 2.5D checkpoint (GET v1/model `neighbors` > 0) every file of
//                 the upload with `parts=K` naming the slice's, so that the server stacks it between the same
//                 neighbours as predict did (the page cannot tell which files those are: it reads no header)
//   each heat map costs the server a backward pass, so the page asks only for the subtype it shows, and asks
//   again (cached per slice and subtype) when another is chosen
//   limits        the server's max_files and max_body_bytes (GET v1/model `limits`) are checked before sending:
//                 a plain CNN checkpoint's series goes in as many requests as they need; a sequence or 2.5D one
//                 needs the series in one request, so the page says which limit it is over and sends nothing
//   a 401         the token form appears; the token is kept in sessionStorage and the request is sent again
//   unmatched     a sequence checkpoint answers in slice order, matched to the files by image id: a slice whose
//                 id is empty or shared by several files cannot be matched, and shows its bars but no image
//
// Stable hooks (tests and scripts):
//   #status[data-state = idle | loading | auth | error | ready | unmatched][data-slice][data-image-id]
//   #bars .bar[data-label][data-probability (the API's number)][data-threshold][data-above = true | false]
//     [data-cnn-probability (a sequence checkpoint's CNN alone; empty for a CNN checkpoint)]
//   #heatmap (canvas; data-subtype, data-window, data-opacity of the last drawing), #subtype, #base-window, #opacity
//   #strip .cell[data-slice][data-probability][data-image-id][data-unmatched = true | false][aria-selected]
//   #strip-caption (the number of requests a series took, the unmatched slices), #slice-label[data-slice][data-image-id]
//   #windows figure[data-window] img, #token-form[data-waiting = model | upload | slice], #token, #error, #files, #drop
"use strict";

const TOKEN_KEY = "raysys.token"; // sessionStorage: gone when the tab closes
const STRIP_LABEL = "any"; // the strip's per-slice colour
const DEFAULT_THRESHOLD = 0.5;
const DEFAULT_SUBTYPE = "any";
const ID_LOOKUPS = 4; // concurrent requests when a file's image id must be asked for (see partsInOrder)
const PART_BYTES = 512; // what a multipart part adds to its file (boundary and headers; ~200 bytes in Chromium)
// Relative paths: the page works under any route prefix the app is served at.
const API = { model: "v1/model", predict: "v1/predict", explain: "v1/explain" };

const $ = (id) => document.getElementById(id);

const state = {
  model: null, // the /v1/model answer
  files: [], // the upload's files, in the order chosen: the parts of a whole-series request
  slices: [], // in slice order: {imageId, series, slice, probabilities, cnnProbabilities, part (in files; null: unmatched)}
  requests: 0, // the predict requests the upload took (over 1 where the server's limits split a series)
  selected: -1,
  explained: new Map(), // "slice:subtype" -> Promise of that slice's /v1/explain answer with that heat map
  drawings: new WeakMap(), // explain answer -> Map(key -> Promise of a drawable: window bitmap or coloured heat map)
  current: null, // the explain answer on the canvas
  thresholds: {}, // label -> decision threshold in [0, 1]
  pending: null, // the task to run again once a token is given
  upload: null, // identity of the latest upload: answers for an older one are dropped
  selection: null, // identity of the latest selection, likewise
};

class AuthRequired extends Error {}

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

// ---------------------------------------------------------------- API

async function api(path, init = {}) {
  const headers = new Headers(init.headers || {});
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (token) headers.set("Authorization", `Bearer ${token}`);
  let response;
  try {
    response = await fetch(path, { ...init, headers });
  } catch (e) {
    throw new ApiError(0, `cannot reach the server (${e.message})`);
  }
  if (response.status === 401) {
    throw new AuthRequired(token ? "That token was not accepted; enter it again." : "");
  }
  const text = await response.text();
  let body = null;
  try {
    body = JSON.parse(text);
  } catch {
    body = null;
  }
  if (!response.ok) {
    const reason = body && typeof body.error === "string" ? body.error : text.slice(0, 300) || response.statusText;
    throw new ApiError(response.status, reason);
  }
  if (body === null) throw new ApiError(response.status, "the server's answer is not JSON");
  return body;
}

function postDicom(path, file) {
  return api(path, { method: "POST", headers: { "Content-Type": "application/dicom" }, body: file });
}

function postFiles(path, files) {
  const form = new FormData();
  // Neutral part names: the user's file names never leave the browser.
  files.forEach((file, i) => form.append("files", file, `slice-${i + 1}.dcm`));
  return api(path, { method: "POST", body: form });
}

async function ensureModel() {
  if (!state.model) {
    const model = await api(API.model);
    state.model = model;
    showModel(model);
    buildControls(model);
  }
  return state.model;
}

// Runs a user action: a 401 asks for the token (and keeps the action to run again), other errors are shown.
// `what` names the action in the token form (and its data-waiting hook): model, upload or slice.
async function run(task, what) {
  try {
    await task();
  } catch (e) {
    if (e instanceof AuthRequired) {
      state.pending = { task, what };
      askToken(e.message, what);
    } else {
      showError(e);
    }
  }
}

// ---------------------------------------------------------------- uploads and slices

async function upload(chosen) {
  const files = [...chosen].filter((f) => !f.name.startsWith(".")); // .DS_Store and friends
  if (!files.length) throw new ApiError(0, "No files were chosen.");
  const mine = (state.upload = Symbol("upload"));
  state.selection = null;
  state.files = [];
  state.slices = [];
  state.selected = -1;
  state.explained = new Map();
  state.current = null;
  hideError();
  $("series").hidden = true;
  $("viewer").hidden = true;
  setStatus("loading", files.length === 1 ? "Explaining the slice…" : `Scoring ${files.length} slices…`);
  const model = await ensureModel();
  const batches = requestsFor(files, model); // before anything is sent: a limit is named, not met with a bare 413
  let slices;
  let explained = null;
  const subtype = $("subtype").value; // the heat map asked for with a single file's upload
  if (files.length === 1) {
    explained = postDicom(explainPath(subtype), files[0]);
    const answer = await explained;
    slices = [sliceOf(answer, 0)];
  } else {
    const results = [];
    for (const [i, batch] of batches.entries()) {
      if (batches.length > 1) setStatus("loading", `Scoring ${files.length} slices: request ${i + 1} of ${batches.length}…`);
      results.push(...(await postFiles(API.predict, batch)).results);
    }
    const parts = await partsInOrder(results, files);
    slices = results.map((result, i) => sliceOf(result, parts[i]));
  }
  if (state.upload !== mine) return;
  state.files = files;
  state.requests = batches.length;
  state.slices = slices;
  if (explained) state.explained.set(`0:${subtype}`, explained);
  renderStrip();
  await select(0);
}

function sliceOf(result, part) {
  return {
    imageId: result.image_id,
    series: Number.isInteger(result.series) ? result.series : null,
    slice: Number.isInteger(result.slice) ? result.slice : null,
    probabilities: result.probabilities,
    cnnProbabilities: result.cnn_probabilities || null,
    part,
  };
}

// A sequence stage reads a series in one request, and so does a 2.5D checkpoint (a slice's neighbours come from
// its request): such a series cannot be split to fit the server's limits.
function needsWholeSeries(model) {
  return model.stage === "sequence" || model.neighbors > 0;
}

function mib(bytes) {
  return `${(bytes / 1048576).toFixed(1)} MiB`;
}

// The files in requests of at most the server's max_files files and max_body_bytes bytes (GET v1/model `limits`),
// in their order: one request where they fit; several for a plain CNN checkpoint, which scores each slice alone.
// Throws, naming the limit and sending nothing, where a file alone is over it or the checkpoint needs one request.
function requestsFor(files, model) {
  const limits = model.limits || {};
  const most = limits.max_files ?? Infinity;
  const bytes = limits.max_body_bytes ?? Infinity;
  const sizeOf = (file) => (files.length === 1 ? file.size : file.size + PART_BYTES); // one file: a raw body
  const big = files.find((file) => sizeOf(file) > bytes);
  if (big) {
    throw new ApiError(0, `A chosen file is ${mib(big.size)}, over the server's limit of ${mib(bytes)} per request ` +
      "(serve max_body_bytes): nothing was sent.");
  }
  const total = files.reduce((sum, file) => sum + sizeOf(file), 0);
  if (files.length <= most && total <= bytes) return [files];
  if (needsWholeSeries(model)) {
    const over = [files.length > most ? `${files.length} files, more than its ${most} per request (serve max_files)` : "",
      total > bytes ? `${mib(total)}, more than its ${mib(bytes)} per request (serve max_body_bytes)` : ""];
    const why = model.stage === "sequence" ? "a sequence checkpoint" : `a 2.5D checkpoint (${model.neighbors} neighbours)`;
    throw new ApiError(0, `These files are over the server's limits: ${over.filter(Boolean).join(", and ")}. ` +
      `This is ${why}, which must read a series in one request, so nothing was sent: choose fewer files ` +
      "(one series at a time), or ask for higher limits.");
  }
  const batches = [[]];
  let used = 0;
  for (const file of files) {
    const last = batches[batches.length - 1];
    if (last.length && (last.length >= most || used + sizeOf(file) > bytes)) {
      batches.push([]);
      used = 0;
    }
    batches[batches.length - 1].push(file);
    used += sizeOf(file);
  }
  return batches;
}

// The part (index in `files`) of each result, null where it cannot be told. A CNN checkpoint answers in part
// order. A sequence checkpoint answers in slice order (from the DICOM positions, which this page does not read),
// so each file's image id is asked of the API; a slice whose id is empty or shared by several files is unmatched
// (null): showing it any one of those files' images would show the wrong slice.
async function partsInOrder(results, files) {
  if (results.length !== files.length) {
    throw new ApiError(0, `the server answered ${results.length} results for ${files.length} files`);
  }
  if (state.model.stage !== "sequence") return files.map((_, i) => i);
  setStatus("loading", `Matching ${files.length} files to their slices…`);
  const ids = await mapLimited(files, ID_LOOKUPS, async (file) => (await postDicom(API.predict, file)).image_id);
  const count = new Map();
  ids.forEach((id) => count.set(id, (count.get(id) || 0) + 1));
  return results.map((r) => (r.image_id && count.get(r.image_id) === 1 ? ids.indexOf(r.image_id) : null));
}

async function mapLimited(items, limit, fn) {
  const out = new Array(items.length);
  let next = 0;
  async function worker() {
    while (next < items.length) {
      const i = next++;
      out[i] = await fn(items[i]);
    }
  }
  await Promise.all(Array.from({ length: Math.min(limit, items.length) }, worker));
  return out;
}

function explainPath(subtype) {
  return `${API.explain}?labels=${encodeURIComponent(subtype)}`;
}

// Slice k's /v1/explain answer. A 2.5D checkpoint stacks a slice between its neighbours from the same request, so
// the whole upload goes again with the slice named by `parts` (the server explains that part only); a three-channel
// checkpoint needs the slice's file alone.
function explainSlice(k, subtype) {
  const key = `${k}:${subtype}`;
  let promise = state.explained.get(key);
  if (!promise) {
    const part = state.slices[k].part;
    if (part === null) return Promise.reject(new ApiError(0, `cannot tell which of the chosen files is slice ${k + 1}`));
    if (state.model.neighbors > 0 && state.files.length > 1) {
      promise = postFiles(`${explainPath(subtype)}&parts=${part + 1}`, state.files).then((answer) => answer.results[0]);
    } else {
      promise = postDicom(explainPath(subtype), state.files[part]);
    }
    state.explained.set(key, promise);
    promise.catch(() => state.explained.get(key) === promise && state.explained.delete(key)); // a failure is not cached
  }
  return promise;
}

async function select(k) {
  if (k < 0 || k >= state.slices.length) return;
  const mine = (state.selection = Symbol("selection"));
  const upload = state.upload;
  state.selected = k;
  const s = state.slices[k];
  hideError(); // an earlier slice's error; this one shows its own
  markStrip(k);
  showSliceLabel(k, s);
  renderBars(s);
  const viewer = $("viewer");
  if (s.part === null) {
    showUnmatched(k, s);
    return;
  }
  setStatus("loading", `Explaining slice ${k + 1}…`);
  viewer.hidden = false;
  viewer.classList.add("waiting"); // the canvas still shows the previous slice
  let answer;
  try {
    answer = await explainSlice(k, $("subtype").value);
  } finally {
    if (state.selection === mine) viewer.classList.remove("waiting");
  }
  if (state.selection !== mine || state.upload !== upload) return;
  if (answer.image_id !== s.imageId) {
    throw new ApiError(0, `slice ${k + 1} is image ${s.imageId}, but the server explained image ${answer.image_id}`);
  }
  state.current = answer;
  renderWindows(answer);
  $("explain-method").textContent = answer.explain ? `${answer.explain.method} at ${answer.explain.layer}` : "";
  await drawHeatmap();
  if (state.selection !== mine) return;
  setStatus("ready", readyText(k), { slice: k, imageId: s.imageId });
}

function unmatchedCount() {
  return state.slices.filter((s) => s.part === null).length;
}

function readyText(k) {
  const n = unmatchedCount();
  return `Slice ${k + 1} of ${state.slices.length} ready${n ? ` · ${n} unmatched, shown without an image` : ""}`;
}

// A slice whose file cannot be told (see partsInOrder): its bars, which are the server's for it, and no image.
function showUnmatched(k, s) {
  state.current = null;
  $("viewer").hidden = false;
  $("viewer").classList.remove("waiting");
  $("windows").replaceChildren();
  $("explain-method").textContent = "";
  const canvas = $("heatmap");
  canvas.getContext("2d").clearRect(0, 0, canvas.width, canvas.height);
  Object.assign(canvas.dataset, { subtype: "", window: "", opacity: "" });
  const why = s.imageId ? "several chosen files have its SOPInstanceUID" : "it has no SOPInstanceUID";
  setStatus("unmatched", `Slice ${k + 1} of ${state.slices.length} unmatched: no image, as ${why}`,
    { slice: k, imageId: s.imageId });
}

// Another subtype chosen: its heat map of the slice on screen, asked for now unless the page has it.
async function showSubtype() {
  const k = state.selected;
  const answer = state.current;
  const label = $("subtype").value;
  if (k < 0) return;
  // The selected slice still loading (the canvas shows another): load it again, with this subtype's map.
  if (!answer || answer.image_id !== state.slices[k].imageId) return select(k);
  if (answer.heatmaps[label]) return drawHeatmap();
  const mine = (state.selection = Symbol("selection"));
  setStatus("loading", `Explaining slice ${k + 1} for ${label}…`);
  $("viewer").classList.add("waiting");
  let more;
  try {
    more = await explainSlice(k, label);
  } finally {
    if (state.selection === mine) $("viewer").classList.remove("waiting");
  }
  if (state.selection !== mine || state.current !== answer) return;
  Object.assign(answer.heatmaps, more.heatmaps); // the slice's answer keeps every map fetched for it
  await drawHeatmap();
  if (state.selection !== mine) return;
  setStatus("ready", readyText(k), { slice: k, imageId: state.slices[k].imageId });
}

function step(delta) {
  if (state.slices.length < 2 || state.selected < 0) return;
  const k = Math.min(state.slices.length - 1, Math.max(0, state.selected + delta));
  if (k !== state.selected) run(() => select(k), "slice");
}

// ---------------------------------------------------------------- rendering

function setStatus(name, text, selected = null) {
  const status = $("status");
  status.dataset.state = name;
  status.textContent = text;
  status.dataset.slice = selected ? String(selected.slice) : "";
  status.dataset.imageId = selected ? selected.imageId : "";
}

function showError(e) {
  const where = e instanceof ApiError && e.status ? `The server answered ${e.status}: ` : "";
  // The API names a file by its place in the request ("part 3"): the third file chosen.
  const parts = /^part \d+:/.test(e.message) ? " (parts count the chosen files in order)" : "";
  const box = $("error");
  box.textContent = `${where}${e.message}${parts}`;
  box.hidden = false;
  setStatus("error", "Error: see the message below");
}

function hideError() {
  $("error").hidden = true;
  $("error").textContent = "";
}

const WAITING = {
  model: "The page loads once it is accepted.",
  upload: "The chosen files are sent once it is accepted.",
  slice: "The slice is sent once it is accepted.",
};

function askToken(message, what) {
  const form = $("token-form");
  form.hidden = false;
  form.dataset.waiting = what;
  const intro = message || "Paste the bearer token of this server; it is kept for this tab only.";
  $("token-message").textContent = `${intro} ${WAITING[what] || ""}`;
  $("token").value = "";
  $("token").focus();
  setStatus("auth", "Waiting for the API token");
}

function showModel(model) {
  const info = model.model || {};
  const loss = typeof info.val_weighted_log_loss === "number" ? ` · val loss ${info.val_weighted_log_loss.toFixed(3)}` : "";
  $("model-info").textContent =
    `${model.stage} checkpoint ${info.checkpoint ?? ""} · epoch ${info.epoch ?? "?"} · ${model.image_size} px${loss}`;
}

function buildControls(model) {
  const bars = $("bars");
  const subtype = $("subtype");
  bars.replaceChildren();
  subtype.replaceChildren();
  for (const label of model.labels) {
    state.thresholds[label] = DEFAULT_THRESHOLD;
    subtype.append(new Option(label, label, false, label === DEFAULT_SUBTYPE));

    const bar = element("div", "bar", { label, probability: "", threshold: String(DEFAULT_THRESHOLD), above: "false" });
    const track = element("div", "bar-track");
    track.append(element("div", "bar-fill"), element("div", "bar-cnn"), element("div", "bar-threshold"));
    const input = element("input", "threshold", { label });
    Object.assign(input, { type: "number", min: "0", max: "1", step: "0.01", value: String(DEFAULT_THRESHOLD) });
    input.setAttribute("aria-label", `decision threshold for ${label}`);
    input.addEventListener("input", () => {
      const value = Number(input.value);
      if (input.value !== "" && value >= 0 && value <= 1) setThreshold(label, value, false);
    });
    bar.append(element("span", "bar-name", {}, label), track, element("span", "bar-value"), input);
    bars.append(bar);
  }
}

function element(tag, className, data = {}, text = "") {
  const node = document.createElement(tag);
  if (className) node.className = className;
  for (const [key, value] of Object.entries(data)) node.dataset[key] = value;
  if (text) node.textContent = text;
  return node;
}

function setThreshold(label, value, updateInput = true) {
  state.thresholds[label] = value;
  if (updateInput) document.querySelector(`#bars input.threshold[data-label="${label}"]`).value = String(value);
  if (state.selected >= 0) renderBars(state.slices[state.selected]);
  if (label === STRIP_LABEL) markStrip(state.selected);
}

function renderBars(s) {
  const sequence = state.model.stage === "sequence";
  $("bars-source").textContent = state.slices.length > 1
    ? (sequence ? "Read in the context of its series (sequence checkpoint); the thin mark is the CNN alone."
                : "This slice alone (CNN checkpoint).")
    : (sequence ? "One file: scored as a series of one; the thin mark is the CNN alone." : "This slice alone (CNN checkpoint).");
  for (const bar of document.querySelectorAll("#bars .bar")) {
    const label = bar.dataset.label;
    const p = s.probabilities[label];
    const threshold = state.thresholds[label];
    const above = p >= threshold;
    bar.dataset.probability = String(p);
    bar.dataset.threshold = String(threshold);
    bar.dataset.above = String(above);
    bar.classList.toggle("above", above);
    bar.querySelector(".bar-fill").style.width = `${(100 * p).toFixed(2)}%`;
    bar.querySelector(".bar-threshold").style.left = `${(100 * threshold).toFixed(2)}%`;
    const cnn = bar.querySelector(".bar-cnn");
    const q = s.cnnProbabilities ? s.cnnProbabilities[label] : null;
    cnn.hidden = q === null || q === undefined;
    bar.dataset.cnnProbability = cnn.hidden ? "" : String(q);
    if (!cnn.hidden) {
      cnn.style.left = `${(100 * q).toFixed(2)}%`;
      cnn.title = `CNN alone: ${q.toFixed(3)}`;
    }
    bar.querySelector(".bar-value").textContent = p.toFixed(3);
    bar.title = `${label}: ${p} (threshold ${threshold}${above ? ", above" : ""})`;
  }
}

function renderStrip() {
  const strip = $("strip");
  strip.replaceChildren();
  const n = state.slices.length;
  $("series").hidden = n < 2;
  if (n < 2) return;
  const series = new Set(state.slices.map((s) => s.series));
  state.slices.forEach((s, k) => {
    const p = s.probabilities[STRIP_LABEL];
    const unmatched = s.part === null;
    const cell = element("button", "cell", { slice: String(k), probability: String(p), imageId: s.imageId,
      unmatched: String(unmatched) });
    cell.type = "button";
    cell.setAttribute("role", "option");
    cell.title = `slice ${k + 1}: ${STRIP_LABEL} ${p.toFixed(3)}${unmatched ? " (no file matched: no image)" : ""}`;
    cell.classList.toggle("unmatched", unmatched);
    cell.style.backgroundColor = stripColour(p); // the colour only: an unmatched cell keeps its hatching
    if (k > 0 && s.series !== state.slices[k - 1].series) cell.classList.add("series-start");
    cell.addEventListener("click", () => run(() => select(k), "slice"));
    strip.append(cell);
  });
  const order = state.model.stage === "sequence" ? "in slice order" : "in the order chosen (a CNN checkpoint does not sort)";
  const groups = series.size > 1 && !series.has(null) ? ` in ${series.size} series` : "";
  const split = state.requests > 1 ? ` Sent in ${state.requests} requests (the server's limits per request).` : "";
  const missing = unmatchedCount();
  const unmatched = missing ? ` ${missing} hatched slices could not be matched to a file (no SOPInstanceUID, or one ` +
    "that several files share): they show no image." : "";
  $("strip-caption").textContent =
    `${n} slices${groups}, ${order}; colour: P(${STRIP_LABEL}). Arrow keys or a click move through them.${split}${unmatched}`;
}

function markStrip(k) {
  const threshold = state.thresholds[STRIP_LABEL];
  for (const cell of document.querySelectorAll("#strip .cell")) {
    const selected = Number(cell.dataset.slice) === k;
    cell.setAttribute("aria-selected", String(selected));
    cell.classList.toggle("selected", selected);
    cell.classList.toggle("above", Number(cell.dataset.probability) >= threshold);
    if (selected) cell.scrollIntoView({ block: "nearest", inline: "nearest" });
  }
}

function showSliceLabel(k, s) {
  const label = $("slice-label");
  const series = s.series !== null && new Set(state.slices.map((x) => x.series)).size > 1 ? ` · series ${s.series + 1}` : "";
  label.replaceChildren(`Slice ${k + 1} of ${state.slices.length}${series} · `, element("code", "", {}, s.imageId || "(no SOPInstanceUID)"));
  label.dataset.slice = String(k);
  label.dataset.imageId = s.imageId;
  $("viewer").dataset.slice = String(k);
}

function renderWindows(answer) {
  const select = $("base-window");
  const names = answer.windows.map((w) => w.name);
  if ([...select.options].map((o) => o.value).join() !== names.join()) {
    const keep = select.value;
    select.replaceChildren(...names.map((name) => new Option(name, name, false, name === keep)));
  }
  const box = $("windows");
  box.replaceChildren();
  for (const w of answer.windows) {
    const figure = element("figure", "window", { window: w.name });
    figure.classList.toggle("selected", w.name === select.value);
    const img = document.createElement("img");
    img.src = `data:image/png;base64,${w.png}`;
    img.alt = `${w.name} window`;
    figure.title = `show the heat map over the ${w.name} window`;
    figure.addEventListener("click", () => {
      select.value = w.name;
      markWindow();
      drawHeatmap();
    });
    const caption = element("figcaption", "", {}, w.name);
    caption.append(element("small", "", {}, `C ${w.center} / W ${w.width}`));
    figure.append(img, caption);
    box.append(figure);
  }
}

function markWindow() {
  for (const figure of document.querySelectorAll("#windows figure")) {
    figure.classList.toggle("selected", figure.dataset.window === $("base-window").value);
  }
}

// ---------------------------------------------------------------- canvas

// Turbo (Mikhailov 2019), 17 stops sampled evenly from 0 to 1 and joined linearly: heat 0..255 -> [r, g, b].
const TURBO = ["#30123b", "#4040a2", "#466be3", "#4294ff", "#28bceb", "#18ddc2", "#32f298", "#6dfe62", "#a4fc3c",
  "#cdec34", "#eecf3a", "#fdac34", "#fb7e21", "#eb500e", "#d02f05", "#a91601", "#7a0403"];
const COLORMAP = Array.from({ length: 256 }, (_, i) => {
  const rgb = (hex) => [1, 3, 5].map((j) => parseInt(hex.slice(j, j + 2), 16));
  const at = (i / 255) * (TURBO.length - 1);
  const k = Math.min(TURBO.length - 2, Math.floor(at));
  const [lo, hi, t] = [rgb(TURBO[k]), rgb(TURBO[k + 1]), at - k];
  return lo.map((c, j) => Math.round(c + t * (hi[j] - c)));
});

async function decodePng(base64) {
  const bytes = Uint8Array.from(atob(base64), (c) => c.charCodeAt(0));
  // No colour management: a grey value of the PNG is the value drawn (the heat, or the window's level).
  return createImageBitmap(new Blob([bytes], { type: "image/png" }), { colorSpaceConversion: "none", premultiplyAlpha: "none" });
}

async function colourise(base64) {
  const bitmap = await decodePng(base64);
  const canvas = document.createElement("canvas");
  canvas.width = bitmap.width;
  canvas.height = bitmap.height;
  const ctx = canvas.getContext("2d", { willReadFrequently: true });
  ctx.drawImage(bitmap, 0, 0);
  const image = ctx.getImageData(0, 0, canvas.width, canvas.height);
  const px = image.data; // RGBA; a grey PNG has r = g = b = heat * 255
  for (let i = 0; i < px.length; i += 4) {
    const [r, g, b] = COLORMAP[px[i]];
    px[i] = r;
    px[i + 1] = g;
    px[i + 2] = b;
    px[i + 3] = 255;
  }
  ctx.putImageData(image, 0, 0);
  return canvas;
}

function drawing(answer, key, make) {
  let cache = state.drawings.get(answer);
  if (!cache) state.drawings.set(answer, (cache = new Map()));
  if (!cache.has(key)) cache.set(key, make());
  return cache.get(key);
}

async function drawHeatmap() {
  const answer = state.current;
  if (!answer) return;
  const canvas = $("heatmap");
  const label = $("subtype").value;
  const opacity = Number($("opacity").value) / 100;
  const win = answer.windows.find((w) => w.name === $("base-window").value) || answer.windows[0];
  const heat = answer.heatmaps && answer.heatmaps[label];
  const [base, overlay] = await Promise.all([
    drawing(answer, `window:${win.name}`, () => decodePng(win.png)),
    heat ? drawing(answer, `heat:${label}`, () => colourise(heat)) : null,
  ]);
  if (state.current !== answer) return;
  const ctx = canvas.getContext("2d", { willReadFrequently: true });
  ctx.globalAlpha = 1;
  ctx.imageSmoothingEnabled = true;
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  ctx.drawImage(base, 0, 0, canvas.width, canvas.height);
  if (overlay) {
    ctx.globalAlpha = opacity;
    ctx.drawImage(overlay, 0, 0, canvas.width, canvas.height);
    ctx.globalAlpha = 1;
  }
  Object.assign(canvas.dataset, { subtype: label, window: win.name, opacity: String(opacity) });
}

function drawLegend() {
  const canvas = $("legend");
  const ctx = canvas.getContext("2d");
  for (let x = 0; x < canvas.width; x++) {
    const [r, g, b] = COLORMAP[Math.round((255 * x) / (canvas.width - 1))];
    ctx.fillStyle = `rgb(${r},${g},${b})`;
    ctx.fillRect(x, 0, 1, canvas.height);
  }
}

// Strip cells: pale for a low probability, amber at 0.5, red for a high one.
function stripColour(p) {
  const stops = [[0, [233, 238, 243]], [0.5, [244, 185, 66]], [1, [198, 40, 40]]];
  const i = p <= 0.5 ? 0 : 1;
  const [[p0, c0], [p1, c1]] = [stops[i], stops[i + 1]];
  const t = Math.min(1, Math.max(0, (p - p0) / (p1 - p0)));
  return `rgb(${c0.map((c, j) => Math.round(c + t * (c1[j] - c))).join(",")})`;
}

// ---------------------------------------------------------------- input

async function droppedFiles(transfer) {
  // Entries are taken before the first await: a DataTransfer is only readable during its event.
  const entries = [...transfer.items].map((item) => item.webkitGetAsEntry && item.webkitGetAsEntry()).filter(Boolean);
  const plain = [...transfer.files];
  if (!entries.some((entry) => entry.isDirectory)) return plain;
  const files = [];
  async function walk(entry) {
    if (entry.isFile) {
      files.push(await new Promise((ok, fail) => entry.file(ok, fail)));
    } else if (entry.isDirectory) {
      const reader = entry.createReader();
      for (;;) {
        const batch = await new Promise((ok, fail) => reader.readEntries(ok, fail));
        if (!batch.length) break;
        for (const child of batch) await walk(child);
      }
    }
  }
  for (const entry of entries) await walk(entry);
  return files;
}

function editable(target) {
  if (!(target instanceof HTMLElement)) return false;
  if (target.isContentEditable || target.tagName === "SELECT" || target.tagName === "TEXTAREA") return true;
  return target.tagName === "INPUT" && !["file", "button", "submit", "checkbox"].includes(target.type);
}

function wire() {
  const input = $("files");
  input.addEventListener("change", () => {
    const files = [...input.files];
    input.value = ""; // choosing the same files again is a new upload
    if (files.length) run(() => upload(files), "upload");
  });

  const drop = $("drop");
  for (const name of ["dragenter", "dragover"]) {
    drop.addEventListener(name, (e) => {
      e.preventDefault();
      drop.classList.add("over");
    });
  }
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    const files = droppedFiles(e.dataTransfer);
    run(async () => upload(await files), "upload");
  });
  // A file dropped next to the zone must not make the browser leave the page to open it.
  window.addEventListener("dragover", (e) => e.preventDefault());
  window.addEventListener("drop", (e) => e.preventDefault());

  $("token-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const token = $("token").value.trim();
    if (!token) {
      $("token-message").textContent = "The token is empty.";
      return;
    }
    sessionStorage.setItem(TOKEN_KEY, token);
    $("token-form").hidden = true;
    $("token-form").dataset.waiting = "";
    const { task, what } = state.pending || { task: loadModel, what: "model" };
    state.pending = null;
    setStatus("loading", "Sending again with the token…");
    run(task, what);
  });

  $("subtype").addEventListener("change", () => run(showSubtype, "slice"));
  $("base-window").addEventListener("change", () => {
    markWindow();
    drawHeatmap();
  });
  $("opacity").addEventListener("input", () => {
    $("opacity-value").value = (Number($("opacity").value) / 100).toFixed(2);
    drawHeatmap();
  });
  $("threshold-all").addEventListener("input", () => {
    const value = Number($("threshold-all").value);
    $("threshold-all-value").value = value.toFixed(2);
    for (const label of Object.keys(state.thresholds)) setThreshold(label, value);
  });
  $("prev").addEventListener("click", () => step(-1));
  $("next").addEventListener("click", () => step(1));
  document.addEventListener("keydown", (e) => {
    if (editable(e.target) || e.altKey || e.ctrlKey || e.metaKey) return;
    const delta = { ArrowUp: -1, ArrowLeft: -1, ArrowDown: 1, ArrowRight: 1, Home: -Infinity, End: Infinity }[e.key];
    if (delta === undefined || state.slices.length < 2) return;
    e.preventDefault();
    step(Number.isFinite(delta) ? delta : delta > 0 ? state.slices.length : -state.slices.length);
  });
}

async function loadModel() {
  await ensureModel();
  if (!state.slices.length && state.upload === null) setStatus("idle", "Choose or drop DICOM files");
}

wire();
drawLegend();
run(loadModel, "model");
