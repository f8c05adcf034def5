// The search page: query by image (or text, for cross-modal models), show the top results.
// Every URL is relative, so the page works under any route prefix; nothing is loaded from
// elsewhere, so it works offline.
"use strict";

(() => {
  const TOKEN_KEY = "retrieval.query-token";
  const byId = (id) => document.getElementById(id);
  const page = {
    served: byId("served"),
    tokenForm: byId("token-form"),
    token: byId("token"),
    imageForm: byId("image-form"),
    drop: byId("drop"),
    dropText: byId("drop-text"),
    file: byId("file"),
    preview: byId("preview"),
    k: byId("k"),
    textForm: byId("text-form"),
    text: byId("text"),
    error: byId("error"),
    warning: byId("warning"),
    answered: byId("answered"),
    results: byId("results"),
  };
  let chosen = null;
  let objectUrls = [];

  class ApiError extends Error {
    constructor(status, type, message) {
      super(message);
      this.status = status;
      this.type = type;
    }
  }

  function authHeaders(extra) {
    const headers = new Headers(extra || {});
    const token = sessionStorage.getItem(TOKEN_KEY);
    if (token) headers.set("Authorization", `Bearer ${token}`);
    return headers;
  }

  // fetch with the token; a JSON error reply ({"error": {"type", "message"}}) becomes an ApiError.
  async function call(path, options = {}) {
    let response;
    try {
      response = await fetch(path, { ...options, headers: authHeaders(options.headers) });
    } catch (failure) {
      throw new ApiError(0, "network_error", `The server could not be reached (${failure.message}).`);
    }
    const isJson = (response.headers.get("content-type") || "").includes("application/json");
    const body = isJson ? await response.json().catch(() => null) : null;
    if (!response.ok) {
      if (response.status === 401 || response.status === 403) page.tokenForm.hidden = false;
      const error = body && body.error ? body.error : {};
      throw new ApiError(
        response.status,
        error.type || `http_${response.status}`,
        error.message || `${response.status} ${response.statusText}`.trim(),
      );
    }
    return body;
  }

  function showError(error) {
    page.error.replaceChildren();
    if (!error) {
      page.error.hidden = true;
      return;
    }
    const kind = document.createElement("strong");
    kind.textContent = error.type ? `${error.type}: ` : "";
    const text = document.createElement("span");
    text.className = "error-message";
    text.textContent = error.message;
    page.error.append(kind, text);
    page.error.dataset.type = error.type || "";
    page.error.hidden = false;
  }

  function describeModel(model) {
    return model ? `${model.name} version ${model.version}` : "unknown model";
  }

  async function loadVersion() {
    try {
      const info = await call("version");
      page.served.textContent = `Model ${describeModel(info.model)} · index ${info.index_version}`;
      page.served.dataset.indexVersion = info.index_version;
      page.textForm.hidden = !info.text_queries;
      showError(null);
    } catch (error) {
      page.served.textContent = "Not connected";
      showError(error);
    }
  }

  function hitLabel(hit) {
    if (hit.label !== undefined && hit.label !== null) return String(hit.label);
    if (Array.isArray(hit.labels)) return hit.labels.join(", ");
    if (hit.caption) return String(hit.caption);
    return "";
  }

  // Thumbnails are fetched (not linked) so that the bearer token goes with them.
  async function loadThumbnail(card, figure, hit) {
    const image = document.createElement("img");
    image.alt = hitLabel(hit) || `item ${hit.id}`;
    figure.prepend(image);
    try {
      const response = await fetch(hit.thumbnail_url, { headers: authHeaders() });
      if (!response.ok) throw new Error(`${response.status}`);
      const url = URL.createObjectURL(await response.blob());
      objectUrls.push(url);
      await new Promise((resolve, reject) => {
        image.onload = resolve;
        image.onerror = reject;
        image.src = url;
      });
      card.dataset.thumbnail = "loaded";
    } catch {
      image.replaceWith(placeholder(hit));
      card.dataset.thumbnail = "failed";
    }
  }

  function placeholder(hit) {
    const box = document.createElement("div");
    box.className = "placeholder";
    box.textContent = hitLabel(hit) || `#${hit.id}`;
    return box;
  }

  function renderCard(hit) {
    const card = document.createElement("li");
    card.className = "card";
    card.dataset.id = String(hit.id);
    card.dataset.score = String(hit.score);
    const figure = document.createElement("figure");
    const caption = document.createElement("figcaption");
    const label = document.createElement("span");
    label.className = "label";
    label.textContent = hitLabel(hit) || "(no label)";
    const meta = document.createElement("span");
    meta.className = "meta";
    meta.textContent = `#${hit.id} · score ${Number(hit.score).toFixed(4)}`;
    caption.append(label, meta);
    figure.append(caption);
    card.append(figure);
    if (hit.thumbnail_url) {
      loadThumbnail(card, figure, hit);
    } else {
      figure.prepend(placeholder(hit));
    }
    return card;
  }

  function render(reply, seconds) {
    objectUrls.forEach((url) => URL.revokeObjectURL(url));
    objectUrls = [];
    page.results.replaceChildren(...reply.results.map(renderCard));
    page.answered.textContent =
      `${reply.results.length} results from model ${describeModel(reply.model)} · ` +
      `index ${reply.index_version} · ${Math.round(seconds * 1000)} ms`;
    page.answered.dataset.indexVersion = reply.index_version;
    page.answered.dataset.model = reply.model ? `${reply.model.name}/${reply.model.version}` : "";
    page.answered.hidden = false;
    if (reply.partial) {
      const missing = (reply.missing_shards || []).join(", ");
      page.warning.textContent =
        `Partial results: shard ${missing} did not answer in time; better matches may be missing.`;
      page.warning.hidden = false;
    } else {
      page.warning.hidden = true;
    }
  }

  async function run(form, request) {
    const buttons = form.querySelectorAll("button");
    buttons.forEach((button) => { button.disabled = true; });
    page.results.setAttribute("aria-busy", "true");
    const started = performance.now();
    try {
      const reply = await request();
      showError(null);
      render(reply, (performance.now() - started) / 1000);
    } catch (error) {
      page.results.replaceChildren();
      page.answered.hidden = true;
      page.warning.hidden = true;
      showError(error);
    } finally {
      buttons.forEach((button) => { button.disabled = false; });
      page.results.removeAttribute("aria-busy");
    }
  }

  function chooseFile(file) {
    chosen = file || null;
    if (!chosen) return;
    page.dropText.textContent = `${chosen.name} (${Math.ceil(chosen.size / 1024)} KB) · drop or click to change`;
    if (page.preview.src) URL.revokeObjectURL(page.preview.src);
    page.preview.src = URL.createObjectURL(chosen);
    page.preview.hidden = false;
  }

  page.file.addEventListener("change", () => chooseFile(page.file.files[0]));
  ["dragenter", "dragover"].forEach((name) => page.drop.addEventListener(name, (event) => {
    event.preventDefault();
    page.drop.classList.add("over");
  }));
  ["dragleave", "drop"].forEach((name) => page.drop.addEventListener(name, () => page.drop.classList.remove("over")));
  page.drop.addEventListener("drop", (event) => {
    event.preventDefault();
    chooseFile(event.dataTransfer.files[0]);
  });

  page.imageForm.addEventListener("submit", (event) => {
    event.preventDefault();
    if (!chosen) {
      showError({ type: "", message: "Choose or drop an image first." });
      return;
    }
    run(page.imageForm, () => {
      const form = new FormData();
      form.append("file", chosen, chosen.name);
      if (page.k.value) form.append("k", page.k.value);
      return call("search/image", { method: "POST", body: form });
    });
  });

  page.textForm.addEventListener("submit", (event) => {
    event.preventDefault();
    const body = { text: page.text.value };
    if (page.k.value) body.k = Number(page.k.value);
    run(page.textForm, () => call("search/text", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
    }));
  });

  page.tokenForm.addEventListener("submit", (event) => {
    event.preventDefault();
    const token = page.token.value.trim();
    if (token) sessionStorage.setItem(TOKEN_KEY, token);
    else sessionStorage.removeItem(TOKEN_KEY);
    page.token.value = "";
    loadVersion();
  });
  if (sessionStorage.getItem(TOKEN_KEY)) page.tokenForm.hidden = false;

  loadVersion();
})();
