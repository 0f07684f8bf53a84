"""The search page served at `/`: drop an image (or type a text, for a CLIP / SigLIP index), see its
neighbours as a grid of thumbnails. Opened as `/?key=KEY` on a server with an API key, it sends
the key with its requests; the thumbnails' URLs come signed in the answers.

Kept as a Python string (not a data file) so it ships with the package without package-data
configuration. Everything that comes from the index is inserted with `textContent` or as an
attribute value, never as HTML.
"""

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>lvd image search</title>
<style>
  body { font-family: system-ui, sans-serif; margin: 1.5rem; color: #222; background: #fafafa; }
  h1 { font-size: 1.3rem; margin: 0 0 .3rem 0; }
  #info { color: #666; font-size: .85rem; margin-bottom: 1rem; }
  #textform { margin-bottom: .8rem; }
  #text { font-size: 1rem; padding: .3rem; }
  #drop { border: 2px dashed #999; border-radius: 8px; padding: 1.2rem; text-align: center;
          background: #fff; cursor: pointer; display: flex; gap: 1rem; align-items: center; }
  #drop.over { border-color: #2a7; background: #efe; }
  #preview { max-height: 120px; max-width: 160px; display: none; border-radius: 4px; }
  #status { margin: .8rem 0; min-height: 1.2em; }
  #status.error { color: #b00; font-weight: 600; }
  #grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(170px, 1fr)); gap: .8rem; }
  figure { margin: 0; background: #fff; border: 1px solid #ddd; border-radius: 6px; padding: .4rem;
           cursor: pointer; }
  figure img { width: 100%; height: 160px; object-fit: contain; background: #eee; display: block; }
  figcaption { font-size: .8rem; margin-top: .3rem; overflow-wrap: anywhere; }
  .score { font-weight: 700; }
  .meta { color: #666; }
</style>
</head>
<body>
<h1>lvd image search</h1>
<div id="info">loading index information&hellip;</div>
<form id="textform" hidden>
  <input id="text" type="search" placeholder="search by text" size="40" aria-label="search by text">
  <button type="submit">search</button>
</form>
<label id="drop" for="file">
  <img id="preview" alt="query image">
  <span>Drop an image here, or click to choose one.
  <br><small>k = <input id="k" type="number" min="1" max="100" value="12" style="width:4em"></small></span>
  <input id="file" type="file" accept="image/*" hidden>
</label>
<div id="status"></div>
<div id="grid"></div>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
const drop = $("drop"), fileInput = $("file"), grid = $("grid"), statusLine = $("status");
const key = new URLSearchParams(window.location.search).get("key");
const auth = key ? {"X-API-Key": key} : {};

function setStatus(text, isError) {
  statusLine.textContent = text;
  statusLine.className = isError ? "error" : "";
}

fetch("/api/info", {headers: auth}).then(r => r.json()).then(info => {
  const model = (info.embedder && info.embedder.model) || "unknown model";
  const recall = info.expected_recall && info.expected_recall.recall != null
    ? info.expected_recall.recall.toFixed(3) : "?";
  $("info").textContent = `${info.n} images, ${info.factory}, ${model}, expected recall@10 ${recall}`;
  $("textform").hidden = !info.text_tower;
}).catch(() => { $("info").textContent = "index information unavailable"; });

function render(results) {
  grid.replaceChildren();
  for (const hit of results) {
    const fig = document.createElement("figure");
    fig.className = "hit";
    fig.title = "search with this image";
    const img = document.createElement("img");
    img.alt = `id ${hit.id_str}`;
    img.loading = "lazy";
    if (hit.thumbnail) img.src = hit.thumbnail;
    const cap = document.createElement("figcaption");
    const score = document.createElement("span");
    score.className = "score";
    score.textContent = hit.score.toFixed(3);
    const meta = document.createElement("span");
    meta.className = "meta";
    meta.textContent = ` #${hit.rank} id ${hit.id_str}` + (hit.set ? ` \\u00b7 ${hit.set}` : "") +
                       (hit.key ? ` \\u00b7 ${hit.key}` : "");
    cap.append(score, meta);
    fig.append(img, cap);
    fig.addEventListener("click", () => searchById(hit.id_str, hit.thumbnail));
    grid.append(fig);
  }
}

async function show(response, what) {
  let body;
  try { body = await response.json(); } catch (e) { body = {error: `HTTP ${response.status}`}; }
  if (!response.ok) { grid.replaceChildren(); setStatus(body.error || `HTTP ${response.status}`, true); return; }
  render(body.results);
  setStatus(`${body.results.length} neighbours of ${what} (${body.took_ms} ms)`, false);
}

async function searchFile(file) {
  if (!file) return;
  $("preview").src = URL.createObjectURL(file);
  $("preview").style.display = "block";
  setStatus(`searching with ${file.name}\\u2026`, false);
  try {
    const headers = {"Content-Type": file.type || "application/octet-stream"};
    const r = await fetch(`/api/search/image?k=${encodeURIComponent($("k").value)}`,
                          {method: "POST", body: file, headers: {...headers, ...auth}});
    await show(r, file.name);
  } catch (e) { setStatus(`request failed: ${e}`, true); }
}

async function searchById(id, thumbnail) {
  if (thumbnail) { $("preview").src = thumbnail; $("preview").style.display = "block"; }
  const url = `/api/search/id/${id}?k=${encodeURIComponent($("k").value)}`;
  try { await show(await fetch(url, {headers: auth}), `id ${id}`); }
  catch (e) { setStatus(`request failed: ${e}`, true); }
}

async function searchText(text) {
  if (!text.trim()) return;
  $("preview").style.display = "none";
  setStatus(`searching for \u201c${text}\u201d\u2026`, false);
  const url = `/api/search/text?text=${encodeURIComponent(text)}&k=${encodeURIComponent($("k").value)}`;
  try { await show(await fetch(url, {headers: auth}), `\u201c${text}\u201d`); }
  catch (e) { setStatus(`request failed: ${e}`, true); }
}

$("textform").addEventListener("submit", (e) => { e.preventDefault(); searchText($("text").value); });

fileInput.addEventListener("change", () => searchFile(fileInput.files[0]));
for (const ev of ["dragenter", "dragover"]) {
  drop.addEventListener(ev, (e) => { e.preventDefault(); drop.classList.add("over"); });
}
for (const ev of ["dragleave", "drop"]) {
  drop.addEventListener(ev, (e) => { e.preventDefault(); drop.classList.remove("over"); });
}
drop.addEventListener("drop", (e) => searchFile(e.dataTransfer.files[0]));
</script>
</body>
</html>
"""
