// weightmix UI: the form is a recipe; every action sends it to the server, which checks it
// and runs it through weightmix's API. No merge logic lives here.
"use strict";

const $ = (id) => document.getElementById(id);
// extra: settings of an uploaded recipe the form has no field for (seed, title ...), kept;
// uploaded: a recipe the form cannot show exactly, run as it is until the form is edited
const state = { methods: [], models: [], selected: [], uploaded: null, extra: {}, job: null,
  timer: null, asked: 0 };

async function api(path, options = {}) {
  const response = await fetch(path, options);
  if (!response.ok) {
    let message = `${response.status} ${response.statusText}`;
    try { message = (await response.json()).error || message; } catch (e) { /* not JSON */ }
    throw new Error(message);
  }
  return response;
}
const post = (path, body) => api(path, {
  method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
});
const postYaml = (path, text) => api(path, {
  method: "POST", headers: { "Content-Type": "application/yaml" }, body: text,
});
const showError = (error) => { $("error").textContent = error ? String(error.message || error) : ""; };
const letter = (i) => (i < 26 ? String.fromCharCode(65 + i) : `M${i}`);
const modelInfo = (path) => state.models.find((m) => m.path === path);

// ---- models ----
async function loadModels() {
  state.models = await (await api("/api/models")).json();
  state.selected = state.selected.filter((p) => modelInfo(p));
  renderModels();
}

function fillChoices() {  // the rule fields offer the first model's components, blocks, layers
  const first = modelInfo(state.selected[0]) || {};
  for (const [id, values] of [["components-list", first.components], ["blocks-list", first.blocks],
    ["layers-list", first.layers]]) {
    $(id).innerHTML = "";
    for (const value of values || []) $(id).appendChild(new Option(value, value));
  }
}

function renderModels() {
  fillChoices();
  const body = $("model-list").querySelector("tbody");
  body.innerHTML = "";
  state.models.forEach((model, index) => {
    const row = document.createElement("tr");
    const at = state.selected.indexOf(model.path);
    const cells = [at >= 0 ? letter(at) : "", model.path.split("/").pop(),
      model.architecture, model.dtype || "", model.size_text];
    row.innerHTML = `<td><input type="checkbox" class="pick" id="pick-${index}"></td>` +
      cells.map(() => "<td></td>").join("");
    cells.forEach((text, i) => { row.children[i + 1].textContent = text; });
    row.children[2].title = model.path + (model.error ? `\n${model.error}` : "");
    const box = row.querySelector("input");
    box.dataset.path = model.path;
    box.checked = at >= 0;
    box.addEventListener("change", () => {
      state.selected = box.checked ? [...state.selected, model.path]
        : state.selected.filter((p) => p !== model.path);
      formChanged();
      renderModels();
      renderParams(true);
    });
    body.appendChild(row);
  });
}

// ---- method and parameters ----
function currentMethod() { return state.methods.find((m) => m.name === $("method").value); }

function blocksOfFirst() {
  const first = modelInfo(state.selected[0]);
  return first ? first.blocks : [];
}

function renderParams(keep) {
  const method = currentMethod();
  const old = keep ? readParams() : {};
  const box = $("params");
  box.innerHTML = "";
  $("method-summary").textContent = method ? `${method.summary} (${method.inputs} inputs)` : "";
  if (!method) return;
  for (const param of method.params) {
    const row = document.createElement("div");
    row.className = "param";
    row.id = `param-${param.name}`;
    const input = document.createElement("input");
    input.id = `p-${param.name}`;
    input.placeholder = param.required ? "required" : `default ${JSON.stringify(param.default)}`;
    if (param.numeric) {  // text: it may also hold a preset or named blocks (GRAD_V, IN00=1)
      input.inputMode = "decimal";
      const range = [param.minimum, param.maximum].map((v) => (v === null ? "" : v));
      input.title = `a number${range.join("") ? ` from ${range[0]} to ${range[1]}` : ""},`
        + " or per block: a preset or NAME=VALUE,...";
    }
    const label = document.createElement("label");
    label.textContent = `${param.name} `;
    label.appendChild(input);
    row.appendChild(label);
    input.addEventListener("input", formChanged);
    if (param.numeric) row.appendChild(blockControls(param));
    box.appendChild(row);
  }
  writeParams(old);
}

function blockControls(param) {
  const holder = document.createElement("span");
  const toggle = document.createElement("input");
  toggle.type = "checkbox";
  toggle.id = `pb-${param.name}`;
  const label = document.createElement("label");
  label.append(toggle, " per block");
  const preset = document.createElement("select");
  preset.id = `preset-${param.name}`;
  preset.hidden = true;
  const grid = document.createElement("div");
  grid.className = "blocks";
  grid.id = `blocks-${param.name}`;
  grid.hidden = true;
  const blocks = blocksOfFirst();
  toggle.disabled = blocks.length === 0;
  toggle.title = blocks.length ? "" : "the first model's architecture has no blocks";
  const low = param.minimum ?? 0;
  const high = param.maximum ?? 1;
  const fallback = typeof param.default === "number" ? param.default : low;
  blocks.forEach((block) => {
    const cell = document.createElement("label");
    const slider = document.createElement("input");
    slider.type = "range";
    slider.min = low; slider.max = high; slider.step = "any";  // presets keep their values
    slider.value = fallback;
    slider.id = `b-${param.name}-${block}`;
    slider.dataset.block = block;
    const shown = document.createElement("span");
    shown.textContent = `${block} ${Number(slider.value).toFixed(2)}`;
    slider.addEventListener("input", () => {
      shown.textContent = `${block} ${Number(slider.value).toFixed(2)}`;
      formChanged();
    });
    cell.append(shown, slider);
    grid.appendChild(cell);
  });
  toggle.addEventListener("change", async () => {
    grid.hidden = preset.hidden = !toggle.checked;
    if (toggle.checked && preset.options.length === 0) await fillPresets(preset, param.name);
    formChanged();
  });
  preset.addEventListener("change", () => {
    const values = state.presets?.[preset.value];
    if (values) setBlockValues(param.name, values);
    formChanged();
  });
  holder.append(label, preset, grid);
  return holder;
}

async function fillPresets(select, name) {
  select.innerHTML = "<option value=''>preset ...</option>";
  if (!state.selected[0]) return;
  try {
    const url = `/api/presets?model=${encodeURIComponent(state.selected[0])}`;
    state.presets = await (await api(url)).json();
    for (const preset of Object.keys(state.presets)) {
      select.add(new Option(preset, preset));
    }
  } catch (error) { showError(error); }
}

function setBlockValues(name, values) {
  const sliders = document.querySelectorAll(`#blocks-${name} input[type=range]`);
  const low = Math.min(...values), high = Math.max(...values);
  sliders.forEach((slider) => {  // room for every value given
    if (low < Number(slider.min)) slider.min = low;
    if (high > Number(slider.max)) slider.max = high;
  });
  sliders.forEach((slider, i) => {
    if (i < values.length) {
      slider.value = values[i];
      slider.dispatchEvent(new Event("input"));
    }
  });
}

function parseValue(text, numeric) {
  if (numeric && text !== "" && Number.isFinite(Number(text))) return Number(text);
  try { return JSON.parse(text); } catch (e) { return text; }
}

function readParams() {
  const method = currentMethod();
  const found = {};
  if (!method) return found;
  for (const param of method.params) {
    const toggle = $(`pb-${param.name}`);
    if (toggle && toggle.checked) {
      found[param.name] = [...document.querySelectorAll(`#blocks-${param.name} input[type=range]`)]
        .map((s) => Number(s.value));
      continue;
    }
    const input = $(`p-${param.name}`);
    if (input && input.value.trim() !== "") {
      found[param.name] = param.text ? input.value : parseValue(input.value.trim(), param.numeric);
    }
  }
  return found;
}

// the parameters into the form; false when one cannot be shown as it is
function writeParams(values) {
  let exact = true;
  for (const [name, value] of Object.entries(values)) {
    const input = $(`p-${name}`);
    if (!input) { exact = false; continue; }
    const toggle = $(`pb-${name}`);
    const sliders = document.querySelectorAll(`#blocks-${name} input[type=range]`);
    if (Array.isArray(value) && toggle && !toggle.disabled && value.length === sliders.length
        && value.every((v) => typeof v === "number")) {
      toggle.checked = true;
      $(`blocks-${name}`).hidden = $(`preset-${name}`).hidden = false;
      fillPresets($(`preset-${name}`), name);
      setBlockValues(name, value);
      if ([...sliders].some((slider, i) => Number(slider.value) !== value[i])) exact = false;
    } else {
      const param = currentMethod().params.find((p) => p.name === name);
      input.value = typeof value === "string" ? value : JSON.stringify(value);
      const back = param.text ? input.value : parseValue(input.value, param.numeric);
      if (JSON.stringify(back) !== JSON.stringify(value)) exact = false;
    }
  }
  return exact;
}

// ---- rules ----
function addRule(rule = {}) {
  const row = document.createElement("div");
  row.className = "rule";
  const fields = [["component", "component"], ["blocks", "blocks e.g. IN00-IN05"],
    ["layer", "layer kind"], ["params", "alpha=0.3, beta=1"]];
  for (const [name, hint] of fields) {
    const input = document.createElement("input");
    input.className = `rule-${name}`;
    const choices = { component: "components-list", blocks: "blocks-list", layer: "layers-list" };
    if (choices[name]) input.setAttribute("list", choices[name]);
    input.placeholder = hint;
    let value = rule[name] ?? "";
    if (name === "params" && rule.params) {
      value = Object.entries(rule.params).map(([k, v]) => `${k}=${JSON.stringify(v)}`).join(", ");
    } else if (Array.isArray(value)) value = value.join(",");
    input.value = value;
    input.addEventListener("input", formChanged);
    row.appendChild(input);
  }
  const remove = document.createElement("button");
  remove.type = "button";
  remove.textContent = "remove";
  remove.addEventListener("click", () => { row.remove(); formChanged(); });
  row.appendChild(remove);
  $("rules").appendChild(row);
}

// "a=1, b=[1, 2], c='x,y'" -> its parts at the commas outside brackets and quotes
function splitTop(text) {
  const parts = [];
  let depth = 0, quote = null, start = 0;
  for (let i = 0; i < text.length; i++) {
    const c = text[i];
    if (quote) { if (c === quote) quote = null; continue; }
    if (c === '"' || c === "'") quote = c;
    else if (c === "[" || c === "{") depth++;
    else if (c === "]" || c === "}") depth--;
    else if (c === "," && depth === 0) { parts.push(text.slice(start, i)); start = i + 1; }
  }
  parts.push(text.slice(start));
  return parts;
}

function readRules() {
  return [...document.querySelectorAll("#rules .rule")].map((row) => {
    const rule = {};
    for (const name of ["component", "blocks", "layer"]) {
      const value = row.querySelector(`.rule-${name}`).value.trim();
      if (value) rule[name] = value;
    }
    const params = {};
    for (const part of splitTop(row.querySelector(".rule-params").value)) {
      const [name, ...rest] = part.split("=");
      if (name.trim() && rest.length) params[name.trim()] = parseValue(rest.join("=").trim(), true);
    }
    if (Object.keys(params).length) rule.params = params;
    return rule;
  });
}

// ---- the recipe ----
function buildRecipe() {
  if (state.uploaded) return state.uploaded;
  const names = state.selected.map((_, i) => letter(i));
  const recipe = {
    ...state.extra,
    models: Object.fromEntries(state.selected.map((p, i) => [names[i], p])),
    merge: { method: $("method").value, inputs: names, ...readParams() },
  };
  if ($("dtype").value) recipe.dtype = $("dtype").value;
  const rules = readRules();
  if (rules.length) recipe.rules = rules;
  return recipe;
}

function request() {
  return { recipe: buildRecipe(), output: $("output").value, overwrite: $("overwrite").checked };
}

function formChanged() {  // the recipe changed: the form's replaces an uploaded one
  if (state.uploaded) {
    state.uploaded = null;
    $("status").textContent = "The form now replaces the uploaded recipe.";
  }
  planChanged();
}

function planChanged() {  // output or overwrite: the recipe stays, the plan is checked again
  clearTimeout(state.timer);
  state.timer = setTimeout(dryRun, 400);
}

function showExtra() {
  const names = Object.keys(state.extra);
  $("extra").textContent = names.length ? `kept from the uploaded recipe: ${names.join(", ")}` : "";
  $("forget-extra").hidden = names.length === 0;
}

async function dryRun() {
  if (!state.selected.length && !state.uploaded) {
    $("plan").textContent = "Pick models to see the plan.";
    return;
  }
  const asked = ++state.asked;  // an older answer arriving late is dropped
  try {
    const found = await (await post("/api/dry-run", request())).json();
    if (asked !== state.asked) return;
    $("plan").textContent = found.plan;
    $("recipe").textContent = found.recipe;
    showError(null);
  } catch (error) {
    if (asked !== state.asked) return;
    $("plan").textContent = "";
    $("recipe").textContent = "";
    showError(error);
  }
}

const FORM_FIELDS = ["models", "merge", "dtype", "rules"];

function fillForm(recipe) {
  state.uploaded = null;
  const models = recipe.models || {};
  const merge = recipe.merge || {};
  state.extra = Object.fromEntries(Object.entries(recipe).filter(([k]) => !FORM_FIELDS.includes(k)));
  const inputs = Array.isArray(merge.inputs) ? merge.inputs : Object.keys(models);
  const flat = inputs.every((i) => typeof i === "string" && i in models);
  state.selected = (flat ? inputs : Object.keys(models)).map((n) => models[n]).filter((p) => p);
  const named = flat && inputs.length === Object.keys(models).length
    && inputs.every((n, i) => n === letter(i));  // the form names the models A, B, C ...
  const missing = state.selected.filter((p) => !modelInfo(p));
  renderModels();
  $("method").value = merge.method || "weighted_sum";
  renderParams(false);
  const params = { ...merge };
  delete params.method; delete params.inputs;
  const exact = writeParams(params) && $("method").value === merge.method;
  $("dtype").value = recipe.dtype || "";
  const dtypeShown = $("dtype").value === (recipe.dtype || "");
  $("rules").innerHTML = "";
  (recipe.rules || []).forEach((rule) => addRule(rule));
  const rulesShown = JSON.stringify(readRules()) === JSON.stringify(recipe.rules || []);
  state.uploaded = null;
  showExtra();
  planChanged();
  const nested = !flat || (recipe.rules || []).some((r) => r.take || r.drop || r.keys || r.regex
    || !r.params);
  if (nested || missing.length || !exact || !named || !dtypeShown || !rulesShown) {
    state.uploaded = recipe;  // merged as uploaded until the form is edited
    $("status").textContent = "The recipe holds more than the form shows; it runs as uploaded"
      + " until you edit the form.";
  }
}

// ---- running ----
function follow(job) {  // the status line follows the latest merge; each is polled
  state.job = job.id;
  $("cancel").disabled = false;
  showJob(job);
  poll(job.id, 0);
}

async function runMerge() {
  showError(null);
  clearTimeout(state.timer);  // the plan and recipe shown are those of what runs
  await dryRun();
  if ($("error").textContent) return;
  try {
    follow(await (await post("/api/merge", request())).json());
  } catch (error) { showError(error); }
}

function showJob(job) {
  $("progress").value = job.progress;
  const waiting = job.status === "queued" && job.ahead ? ` (${job.ahead} merge(s) ahead)` : "";
  $("status").textContent = `merge #${job.id}: ${job.status}${waiting}${job.message ? ": " + job.message : ""}`;
  $("status").dataset.status = job.status;
  if (job.status === "failed") showError(job.message);
}

async function poll(id, failures) {
  try {
    const job = await (await api(`/api/jobs/${id}`)).json();
    if (id === state.job) showJob(job);
    if (job.status === "queued" || job.status === "running") {
      setTimeout(() => poll(id, 0), 300);
      return;
    }
    if (id === state.job) $("cancel").disabled = true;
    loadHistory().catch(showError);
    loadModels().catch(showError);
  } catch (error) {  // the server away a moment: ask again, less often
    if (failures < 20) setTimeout(() => poll(id, failures + 1), 1000 * (failures + 1));
    else showError(error);
  }
}

async function cancelMerge() {
  if (state.job === null) return;
  try { await post(`/api/jobs/${state.job}/cancel`, {}); } catch (error) { showError(error); }
}

async function downloadRecipe() {
  try {
    const text = await (await post("/api/recipe", { recipe: buildRecipe() })).text();
    $("recipe").textContent = text;
    const link = document.createElement("a");
    link.href = URL.createObjectURL(new Blob([text], { type: "application/yaml" }));
    link.download = "recipe.yaml";
    link.click();
  } catch (error) { showError(error); }
}

async function uploadRecipe() {
  const file = $("upload-recipe").files[0];
  if (!file) return;
  showError(null);
  try {
    const found = await (await postYaml("/api/recipe/parse", await file.text())).json();
    fillForm(found.recipe);
    $("status").textContent ||= `loaded ${file.name}`;
  } catch (error) { showError(error); }
  $("upload-recipe").value = "";
}

async function similarity() {
  showError(null);
  try {
    const blob = await (await post("/api/similarity", { models: state.selected })).blob();
    $("heatmap").src = URL.createObjectURL(blob);
    $("heatmap").hidden = false;
  } catch (error) { showError(error); }
}

async function preview() {
  showError(null);
  $("status").textContent = "drawing the preview grid ...";
  try {
    const values = $("preview-values").value.split(",").map((v) => v.trim()).filter((v) => v)
      .map((v) => parseValue(v, false));
    const body = { recipe: buildRecipe(), param: $("preview-param").value, values,
      prompt: $("preview-prompt").value, seed: Number($("preview-seed").value),
      steps: Number($("preview-steps").value), size: Number($("preview-size").value) };
    const blob = await (await post("/api/preview", body)).blob();
    $("preview-grid").src = URL.createObjectURL(blob);
    $("preview-grid").hidden = false;
    $("status").textContent = "preview drawn";
  } catch (error) {
    $("status").textContent = "";
    showError(error);
  }
}

async function loadHistory() {
  const rows = await (await api("/api/history")).json();
  const body = $("history").querySelector("tbody");
  body.innerHTML = "";
  for (const row of rows) {
    const line = document.createElement("tr");
    const finished = row.finished ? new Date(row.finished * 1000).toLocaleString() : "";
    for (const text of [row.id, row.status, row.output, finished, row.message]) {
      const cell = document.createElement("td");
      cell.textContent = text;
      line.appendChild(cell);
    }
    const cell = document.createElement("td");
    const load = document.createElement("button");
    load.type = "button";
    load.textContent = "load";
    load.addEventListener("click", async () => {
      try {
        const text = await (await api(`/api/history/${row.id}/recipe.yaml`)).text();
        const found = await (await postYaml("/api/recipe/parse", text)).json();
        fillForm(found.recipe);
      } catch (error) { showError(error); }
    });
    const again = document.createElement("button");
    again.type = "button";
    again.textContent = "run again";
    again.className = "rerun";
    again.addEventListener("click", async () => {
      showError(null);
      try {
        const body = { overwrite: $("overwrite").checked };
        follow(await (await post(`/api/history/${row.id}/rerun`, body)).json());
      } catch (error) { showError(error); }
    });
    cell.append(load, again);
    line.appendChild(cell);
    body.appendChild(line);
  }
}

async function start() {
  try {
    const found = await (await api("/api/state")).json();
    state.methods = found.methods;
    $("version").textContent = `v${found.version}`;
    $("dirs").textContent = `models: ${found.dirs.join(", ")}`;
    for (const method of state.methods) $("method").add(new Option(method.name, method.name));
    $("method").value = "weighted_sum";
    for (const dtype of found.dtypes) $("dtype").add(new Option(dtype, dtype));
    await loadModels();
    renderParams(false);
    await loadHistory();
    dryRun();
  } catch (error) { showError(error); }
  $("method").addEventListener("change", () => { renderParams(false); formChanged(); });
  $("dtype").addEventListener("change", formChanged);
  for (const id of ["output", "overwrite"]) $(id).addEventListener("change", planChanged);
  $("forget-extra").addEventListener("click", () => { state.extra = {}; showExtra(); formChanged(); });
  $("reload-models").addEventListener("click", () => loadModels().catch(showError));
  $("add-rule").addEventListener("click", () => addRule());
  $("run").addEventListener("click", runMerge);
  $("cancel").addEventListener("click", cancelMerge);
  $("download-recipe").addEventListener("click", downloadRecipe);
  $("upload-recipe").addEventListener("change", uploadRecipe);
  $("similarity").addEventListener("click", similarity);
  $("preview").addEventListener("click", preview);
  document.body.dataset.ready = "yes";
}

start();
