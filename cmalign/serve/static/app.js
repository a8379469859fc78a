// The search page: plain JS against the typed API (/v1/search, /v1/search/image, /v1/indexes).
// The query lives in the URL (?q=… | ?id=…, &modality, &k, &index) so a search can be shared; an uploaded
// image cannot be, and is searched without changing the URL's query.
"use strict";
const $ = (s) => document.querySelector(s);
const form = $("#search"), q = $("#q"), k = $("#k"), index = $("#index"), file = $("#file"), drop = $("#drop");
const statusEl = $("#status"), results = $("#results"), queryCard = $("#query-card");

const modality = () => form.querySelector("input[name=modality]:checked").value;
const setModality = (m) => { const r = form.querySelector(`input[name=modality][value="${m}"]`); if (r) r.checked = true; };

function say(text, isError = false) { statusEl.textContent = text; statusEl.className = isError ? "error" : ""; }

function stateToUrl(state) {
  const p = new URLSearchParams();
  if (state.q) p.set("q", state.q);
  if (state.id !== undefined) p.set("id", state.id);
  p.set("modality", state.modality); p.set("k", state.k);
  if (index.value) p.set("index", index.value);
  history.pushState(state, "", "?" + p.toString());
}

async function post(url, body, isForm = false) {
  const t0 = performance.now();
  const r = await fetch(url, isForm ? { method: "POST", body } :
    { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
  const data = await r.json().catch(() => ({ error: `HTTP ${r.status}` }));
  if (!r.ok) throw new Error(data.field ? `${data.field}: ${data.error}` : (data.error || `HTTP ${r.status}`));
  data.ms = performance.now() - t0;
  return data;
}

function render(data, label) {
  results.innerHTML = "";
  const n = { image: 0, text: 0 };
  for (const h of data.hits) {
    n[h.modality]++;
    const card = document.createElement("article");
    card.className = `hit ${h.modality}`;
    card.dataset.id = h.id;
    card.title = `more like this (id ${h.id})`;
    const badge = `<span class="badge ${h.modality}">${h.modality}</span>`;
    const score = `<span class="score">${h.score.toFixed(3)}</span>`;
    if (h.modality === "image") {
      card.innerHTML = `<img loading="lazy" alt="">` +
        `<div class="caption"></div><div class="meta">${badge}${score}</div>`;
      card.querySelector("img").src = h.url + "?size=256";
      card.querySelector(".caption").textContent = h.label || h.image_path;
    } else {
      card.innerHTML = `<div class="caption"></div><div class="meta">${badge}${score}</div>`;
      card.querySelector(".caption").textContent = h.caption;
    }
    card.addEventListener("click", () => search({ id: h.id }));
    results.appendChild(card);
  }
  say(`${label}: ${data.hits.length} results (${n.image} images, ${n.text} texts) in ${data.ms.toFixed(0)} ms`);
}

function showQuery(html) { queryCard.innerHTML = html; queryCard.hidden = !html; }

async function search(state, push = true) {
  state = { modality: modality(), k: parseInt(k.value, 10) || 24, ...state };
  if (push) stateToUrl(state);
  const base = { index: index.value || null, modality: state.modality, k: state.k };
  try {
    say("searching…");
    if (state.id !== undefined) {
      q.value = "";
      showQuery(`<img src="/image/${encodeURIComponent(index.value)}/${state.id}?size=128" alt=""> more like item ${state.id}`);
      render(await post("/v1/search", { ...base, id: Number(state.id) }), `more like item ${state.id}`);
    } else if (state.q) {
      showQuery("");
      render(await post("/v1/search", { ...base, text: state.q }), `“${state.q}”`);
    } else { results.innerHTML = ""; showQuery(""); say("type a query, or drop an image"); }
  } catch (e) { results.innerHTML = ""; say(e.message, true); }
}

async function searchImage(f) {
  if (!f) return;
  if (!f.type.startsWith("image/")) { say(`${f.name}: not an image`, true); return; }
  const fd = new FormData();
  fd.append("file", f); fd.append("modality", modality()); fd.append("k", k.value);
  if (index.value) fd.append("index", index.value);
  showQuery(`<img src="${URL.createObjectURL(f)}" alt=""> ${f.name}`);
  q.value = "";
  try { say("searching…"); render(await post("/v1/search/image", fd, true), f.name); }
  catch (e) { results.innerHTML = ""; say(e.message, true); }
}

form.addEventListener("submit", (e) => { e.preventDefault(); search({ q: q.value.trim() }); });
file.addEventListener("change", () => { searchImage(file.files[0]); file.value = ""; });
for (const ev of ["dragenter", "dragover"]) drop.addEventListener(ev, (e) => { e.preventDefault(); drop.classList.add("over"); });
for (const ev of ["dragleave", "drop"]) drop.addEventListener(ev, () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => { e.preventDefault(); searchImage(e.dataTransfer.files[0]); });
form.querySelectorAll("input[name=modality]").forEach((r) => r.addEventListener("change", () => {
  const p = new URLSearchParams(location.search);
  if (p.get("q") || p.get("id")) search(p.get("id") ? { id: p.get("id") } : { q: p.get("q") });
}));
window.addEventListener("popstate", () => fromUrl(false));

function fromUrl(push) {
  const p = new URLSearchParams(location.search);
  if (p.get("modality")) setModality(p.get("modality"));
  if (p.get("k")) k.value = p.get("k");
  if (p.get("index")) index.value = p.get("index");
  if (p.get("id") !== null) search({ id: p.get("id") }, push);
  else if (p.get("q")) { q.value = p.get("q"); search({ q: p.get("q") }, push); }
}

(async () => {
  try {
    const list = await (await fetch("/v1/indexes")).json();
    for (const i of list) {
      const o = document.createElement("option");
      o.value = i.name;
      o.textContent = `${i.name} (${i.images.toLocaleString()} images, ${i.texts.toLocaleString()} texts)`;
      index.appendChild(o);
    }
    if (list.length < 2) index.parentElement.hidden = true;
    say("type a query, or drop an image");
    fromUrl(false);
  } catch (e) { say(`cannot list the indexes: ${e.message}`, true); }
})();
