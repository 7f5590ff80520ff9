// The vocabmetric explorer: two neighbour tables side by side and the 2-D map of the store.
//
// It uses only the service's endpoints (GET info, neighbors, projection), by relative URL so
// the page also works behind a path prefix. Token text is untrusted: it reaches the DOM only
// through textContent (tokenNode) and the canvas through fillText, never as HTML.
// Every token the service returns carries its provenance (trained, borrowed, composed, none:
// how it got its vector); the query line, the tables and the tooltip show it.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const COLORS = { query: "#d62728", a: "#1f77b4", b: "#ff7f0e" };
  const WHITESPACE = { " ": "␣", "\n": "↵", "\t": "⇥", "\r": "␍" };
  const LABELS_PER_TABLE = 6; // neighbours labelled on the map, per table
  const PICK_RADIUS = 8; // CSS px: how close the pointer must be to a point to hover or click it
  const PROVENANCE_TITLES = {
    trained: "learned from the corpus (or imported)",
    borrowed: "a trained token's vector with the same normalized text",
    composed: "built from the token's parts",
    none: "no vector: it costs the cap to every other token",
  };
  const PROVENANCE = Object.keys(PROVENANCE_TITLES);

  const state = {
    info: null,
    query: null, // {id, text}
    rows: { a: [], b: [] }, // neighbours shown in each table
    texts: new Map(), // id -> token text, from every answer seen
    provenance: new Map(), // id -> provenance, from every answer seen
    seq: 0, // the latest search; older answers are dropped
    map: null, // {n, ids, x, y, width, height, pointOf}
    view: null, // {scale, tx, ty}: screen = (x * scale + tx, (height - y) * scale + ty), CSS px
    hover: -1,
  };

  // -- token text, always as text --------------------------------------------------------
  /** The text with its whitespace made visible: a space is ␣, a newline ↵, a tab ⇥. */
  function visibleText(text) {
    return text === "" ? "∅" : text.replace(/[ \n\t\r]/g, (c) => WHITESPACE[c]);
  }

  /** A <span class="token"> showing ``text``, whitespace marked; built from text nodes only. */
  function tokenNode(text) {
    const span = document.createElement("span");
    span.className = "token";
    if (text === "") {
      const empty = document.createElement("span");
      empty.className = "empty";
      empty.textContent = "∅ (empty)";
      span.appendChild(empty);
      return span;
    }
    for (const part of text.split(/([ \n\t\r])/)) {
      if (part === "") continue;
      if (part in WHITESPACE) {
        const ws = document.createElement("span");
        ws.className = "ws";
        ws.textContent = WHITESPACE[part];
        span.appendChild(ws);
      } else {
        span.appendChild(document.createTextNode(part));
      }
    }
    return span;
  }

  /** A <span class="provenance NAME"> saying how a token got its vector. */
  function provenanceNode(name) {
    const span = document.createElement("span");
    span.className = `provenance ${PROVENANCE.includes(name) ? name : "unknown"}`;
    span.textContent = name || "?";
    span.title = PROVENANCE_TITLES[name] || "";
    return span;
  }

  function setStatus(message) {
    $("status").textContent = message || "";
  }

  // -- the service -----------------------------------------------------------------------
  async function getJSON(url) {
    const response = await fetch(url);
    let body = null;
    try {
      body = await response.json();
    } catch (e) {
      throw new Error(`${url}: HTTP ${response.status} (not JSON)`);
    }
    if (!response.ok) {
      const err = body && body.error ? body.error : { type: "http_error", message: `HTTP ${response.status}` };
      const error = new Error(err.message);
      error.type = err.type;
      throw error;
    }
    return body;
  }

  /** ``{id}`` or ``{token}`` from what was typed: ``#123`` is an id, ``␣`` may stand for a space. */
  function parseQuery(value) {
    const text = value.replace(/␣/g, " ");
    const id = /^#(\d+)$/.exec(text.trim());
    if (id) return { id: Number(id[1]) };
    if (text === "") return null;
    return { token: text };
  }

  function metricOf(side) {
    return $(`metric-${side}`).value;
  }

  function kValue() {
    const k = Math.round(Number($("k").value));
    return Number.isFinite(k) && k >= 1 ? k : 10;
  }

  /** Ask both tables' neighbours of ``ref`` (``{id}`` or ``{token}``), then show them. */
  async function search(ref) {
    const seq = ++state.seq;
    const k = kValue();
    const ask = (side) => {
      const params = new URLSearchParams();
      if ("id" in ref) params.set("id", String(ref.id));
      else params.set("token", ref.token);
      params.set("k", String(k));
      params.set("metric", metricOf(side));
      return getJSON(`neighbors?${params}`);
    };
    document.body.dataset.state = "searching";
    try {
      const [a, b] = await Promise.all([ask("a"), ask("b")]);
      if (seq !== state.seq) return;
      setStatus("");
      state.query = a.query;
      state.rows = { a: a.neighbors, b: b.neighbors };
      for (const t of [a.query, ...a.neighbors, ...b.neighbors]) {
        state.texts.set(t.id, t.text);
        state.provenance.set(t.id, t.provenance);
      }
      showQuery();
      renderTable("a");
      renderTable("b");
      saveLocation();
      drawMap();
    } catch (error) {
      if (seq !== state.seq) return;
      setStatus(error.message);
    } finally {
      if (seq === state.seq) document.body.dataset.state = "ready";
    }
  }

  function showQuery() {
    const info = $("query-info");
    info.replaceChildren();
    if (!state.query) return;
    const q = state.query;
    info.append("query ", tokenNode(q.text), ` — id ${q.id} · `, provenanceNode(q.provenance));
    info.dataset.id = String(q.id);
    info.dataset.provenance = q.provenance;
    document.body.dataset.queryId = String(q.id);
    if (state.map && state.map.pointOf[q.id] < 0) info.append(" (not on the map: no vector)");
    const noNeighbors = ["a", "b"].filter((s) => state.rows[s].length === 0);
    if (noNeighbors.length) info.append(` · no neighbours under ${noNeighbors.map(metricOf).join(", ")}`);
  }

  function renderTable(side) {
    const other = new Set(state.rows[side === "a" ? "b" : "a"].map((n) => n.id));
    const body = $(`table-${side}`).tBodies[0];
    body.replaceChildren();
    state.rows[side].forEach((n, rank) => {
      const tr = document.createElement("tr");
      tr.dataset.id = String(n.id);
      if (other.has(n.id)) tr.className = "shared";
      tr.dataset.provenance = n.provenance;
      const cells = [String(rank + 1), String(n.id), tokenNode(n.text), n.cost.toPrecision(4), provenanceNode(n.provenance)];
      cells.forEach((value) => {
        const td = document.createElement("td");
        if (typeof value !== "string") td.appendChild(value);
        else {
          td.textContent = value;
          td.className = "num";
        }
        tr.appendChild(td);
      });
      tr.title = `cost ${n.cost}`;
      tr.addEventListener("click", () => search({ id: n.id }));
      body.appendChild(tr);
    });
  }

  // -- the address bar keeps the query, metrics and k ------------------------------------
  function saveLocation() {
    if (!state.query) return;
    const params = new URLSearchParams({ id: String(state.query.id), a: metricOf("a"), b: metricOf("b"), k: String(kValue()) });
    history.replaceState(null, "", `#${params}`);
  }

  function readLocation() {
    const params = new URLSearchParams(location.hash.slice(1));
    for (const side of ["a", "b"]) {
      const m = params.get(side);
      if (m && state.info.metrics[m]) $(`metric-${side}`).value = m;
    }
    if (params.get("k")) $("k").value = params.get("k");
    if (params.get("id") !== null && /^\d+$/.test(params.get("id"))) return { id: Number(params.get("id")) };
    if (params.get("token") !== null) return { token: params.get("token") };
    return null;
  }

  // -- the 2-D map -------------------------------------------------------------------------
  /** Parse a GET projection body: uint32 header length, JSON header, uint32 ids, uint16 x,y. */
  function parseProjection(buffer) {
    const length = new DataView(buffer).getUint32(0, true);
    const header = JSON.parse(new TextDecoder().decode(new Uint8Array(buffer, 4, length)));
    const n = header.count;
    const ids = new Uint32Array(buffer, 4 + length, n);
    const q = new Uint16Array(buffer, 4 + length + 4 * n, 2 * n);
    const [x0, y0, x1, y1] = header.bounds;
    const span = Math.max(x1 - x0, y1 - y0) || 1;
    const width = (x1 - x0) / span, height = (y1 - y0) / span; // the longer side is 1
    const x = new Float32Array(n), y = new Float32Array(n);
    for (let i = 0; i < n; i++) {
      x[i] = (q[2 * i] / 65535) * width;
      y[i] = (q[2 * i + 1] / 65535) * height;
    }
    const pointOf = new Int32Array(header.vocab_size).fill(-1);
    for (let i = 0; i < n; i++) pointOf[ids[i]] = i;
    return { n, ids, x, y, width: width || 1, height: height || 1, pointOf };
  }

  async function loadMap() {
    const t0 = performance.now();
    const response = await fetch("projection");
    if (!response.ok) {
      let message = `HTTP ${response.status}`;
      try {
        message = (await response.json()).error.message;
      } catch (e) { /* keep the status */ }
      $("map-status").textContent = `no map: ${message}`;
      document.body.dataset.map = "missing";
      return;
    }
    state.map = parseProjection(await response.arrayBuffer());
    resetView();
    drawMap();
    $("map-status").textContent = `${state.map.n.toLocaleString()} tokens with a vector on the map (loaded in ${Math.round(performance.now() - t0)} ms)`;
    document.body.dataset.map = "ready";
    showQuery();
  }

  const canvas = $("map");

  function canvasSize() {
    const rect = canvas.getBoundingClientRect();
    return { width: Math.max(1, rect.width), height: Math.max(1, rect.height) };
  }

  function resetView() {
    if (!state.map) return;
    const { width, height } = canvasSize();
    const scale = 0.94 * Math.min(width / state.map.width, height / state.map.height);
    state.view = {
      scale,
      tx: (width - state.map.width * scale) / 2,
      ty: (height - state.map.height * scale) / 2,
    };
  }

  function toScreen(i) {
    const v = state.view, m = state.map;
    return [m.x[i] * v.scale + v.tx, (m.height - m.y[i]) * v.scale + v.ty];
  }

  /** The point nearest to (sx, sy) in CSS px, within PICK_RADIUS, or -1. O(n). */
  function pick(sx, sy) {
    if (!state.map) return -1;
    const v = state.view, m = state.map;
    let best = -1, bestD = PICK_RADIUS * PICK_RADIUS;
    for (let i = 0; i < m.n; i++) {
      const dx = m.x[i] * v.scale + v.tx - sx, dy = (m.height - m.y[i]) * v.scale + v.ty - sy;
      const d = dx * dx + dy * dy;
      if (d <= bestD) {
        bestD = d;
        best = i;
      }
    }
    return best;
  }

  let drawPending = false;
  function drawMap() {
    if (drawPending) return;
    drawPending = true;
    requestAnimationFrame(() => {
      drawPending = false;
      paint();
    });
  }

  /** All points as a density image (one pass), then the query, its neighbours and labels. */
  function paint() {
    const { width, height } = canvasSize();
    const dpr = window.devicePixelRatio || 1;
    const W = Math.round(width * dpr), H = Math.round(height * dpr);
    if (canvas.width !== W || canvas.height !== H) {
      canvas.width = W;
      canvas.height = H;
    }
    const ctx = canvas.getContext("2d");
    ctx.setTransform(1, 0, 0, 1, 0, 0);
    ctx.fillStyle = "#fff";
    ctx.fillRect(0, 0, W, H);
    if (!state.map) return;
    const m = state.map, v = state.view;
    const zoom = v.scale / (0.94 * Math.min(width / m.width, height / m.height));
    const base = m.n < 3000 ? 3 : m.n < 30000 ? 2 : 1;
    const size = Math.max(1, Math.round(base * dpr * Math.min(3, Math.sqrt(Math.max(zoom, 1)))));
    const half = Math.floor(size / 2);
    const density = new Uint16Array(W * H);
    for (let i = 0; i < m.n; i++) {
      const px = Math.round((m.x[i] * v.scale + v.tx) * dpr) - half;
      const py = Math.round(((m.height - m.y[i]) * v.scale + v.ty) * dpr) - half;
      if (px + size <= 0 || py + size <= 0 || px >= W || py >= H) continue;
      for (let yy = Math.max(0, py); yy < Math.min(H, py + size); yy++) {
        const row = yy * W;
        for (let xx = Math.max(0, px); xx < Math.min(W, px + size); xx++) if (density[row + xx] < 65535) density[row + xx]++;
      }
    }
    const image = ctx.createImageData(W, H);
    const rgba = image.data;
    for (let p = 0; p < density.length; p++) {
      const c = density[p];
      // white → slate with the count, on a log scale
      const a = c === 0 ? 0 : Math.min(1, 0.45 + 0.2 * Math.log2(c));
      rgba[4 * p] = 255 - a * (255 - 70);
      rgba[4 * p + 1] = 255 - a * (255 - 85);
      rgba[4 * p + 2] = 255 - a * (255 - 110);
      rgba[4 * p + 3] = 255;
    }
    ctx.putImageData(image, 0, 0);

    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    const labels = [];
    const mark = (id, color, radius, label) => {
      const i = m.pointOf[id];
      if (i < 0) return;
      const [sx, sy] = toScreen(i);
      ctx.beginPath();
      ctx.arc(sx, sy, radius, 0, 2 * Math.PI);
      ctx.fillStyle = color;
      ctx.globalAlpha = 0.85;
      ctx.fill();
      ctx.globalAlpha = 1;
      ctx.lineWidth = 1;
      ctx.strokeStyle = "#fff";
      ctx.stroke();
      if (label) labels.push([sx, sy, radius, color, label]);
    };
    for (const side of ["b", "a"]) {
      state.rows[side].forEach((n, rank) => mark(n.id, COLORS[side], 4, rank < LABELS_PER_TABLE ? visibleText(n.text) : null));
    }
    if (state.query) mark(state.query.id, COLORS.query, 6.5, visibleText(state.query.text));
    if (state.hover >= 0) {
      const [sx, sy] = toScreen(state.hover);
      ctx.beginPath();
      ctx.arc(sx, sy, 6, 0, 2 * Math.PI);
      ctx.lineWidth = 2;
      ctx.strokeStyle = "#000";
      ctx.stroke();
    }
    ctx.font = "12px ui-monospace, 'DejaVu Sans Mono', monospace";
    ctx.textBaseline = "middle";
    const seen = new Set();
    for (const [sx, sy, radius, color, label] of labels.reverse()) {
      const key = `${Math.round(sx / 6)},${Math.round(sy / 6)}`;
      if (seen.has(key)) continue; // one label per spot
      seen.add(key);
      ctx.lineWidth = 3;
      ctx.strokeStyle = "rgba(255,255,255,0.9)";
      ctx.strokeText(label, sx + radius + 3, sy);
      ctx.fillStyle = color;
      ctx.fillText(label, sx + radius + 3, sy);
    }
  }

  // -- hover, zoom, pan, click --------------------------------------------------------------
  function pointer(event) {
    const rect = canvas.getBoundingClientRect();
    return [event.clientX - rect.left, event.clientY - rect.top];
  }

  const tooltip = $("tooltip");
  let hoverTimer = 0;

  function showTooltip(i, sx, sy) {
    if (i < 0) {
      tooltip.hidden = true;
      return;
    }
    const id = state.map.ids[i];
    const fill = (text) => {
      tooltip.replaceChildren(`#${id} `, text === undefined ? "…" : tokenNode(text));
      if (state.provenance.has(id)) tooltip.append(" ", provenanceNode(state.provenance.get(id)));
    };
    fill(state.texts.get(id));
    tooltip.dataset.id = String(id);
    tooltip.style.left = `${sx + 12}px`;
    tooltip.style.top = `${sy + 12}px`;
    tooltip.hidden = false;
    if (!state.texts.has(id)) {
      clearTimeout(hoverTimer);
      hoverTimer = setTimeout(async () => {
        try {
          const answer = await getJSON(`neighbors?id=${id}&k=1&metric=${encodeURIComponent(cheapMetric())}`);
          state.texts.set(id, answer.query.text);
          state.provenance.set(id, answer.query.provenance);
          if (state.hover === i) fill(answer.query.text);
        } catch (e) { /* leave the id */ }
      }, 40);
    }
  }

  /** A metric whose one-neighbour answer is O(k): any stored one (l2 and tree are O(V)). */
  function cheapMetric() {
    const names = Object.keys(state.info.metrics);
    return names.find((m) => m !== "l2" && m !== "tree") || names[0];
  }

  let drag = null;
  canvas.addEventListener("pointerdown", (event) => {
    const [sx, sy] = pointer(event);
    drag = { sx, sy, tx: state.view ? state.view.tx : 0, ty: state.view ? state.view.ty : 0, moved: false };
    canvas.setPointerCapture(event.pointerId);
  });

  canvas.addEventListener("pointermove", (event) => {
    if (!state.map) return;
    const [sx, sy] = pointer(event);
    if (drag) {
      const dx = sx - drag.sx, dy = sy - drag.sy;
      if (drag.moved || dx * dx + dy * dy > 16) {
        drag.moved = true;
        canvas.classList.add("dragging");
        state.view.tx = drag.tx + dx;
        state.view.ty = drag.ty + dy;
        tooltip.hidden = true;
        drawMap();
        return;
      }
    }
    const i = pick(sx, sy);
    if (i !== state.hover) {
      state.hover = i;
      drawMap();
    }
    showTooltip(i, sx, sy);
  });

  canvas.addEventListener("pointerup", (event) => {
    const wasClick = drag && !drag.moved;
    drag = null;
    canvas.classList.remove("dragging");
    if (!wasClick || !state.map) return;
    const [sx, sy] = pointer(event);
    const i = pick(sx, sy);
    if (i >= 0) search({ id: state.map.ids[i] });
  });

  canvas.addEventListener("pointerleave", () => {
    tooltip.hidden = true;
    if (state.hover >= 0) {
      state.hover = -1;
      drawMap();
    }
  });

  canvas.addEventListener("wheel", (event) => {
    if (!state.map) return;
    event.preventDefault();
    const [sx, sy] = pointer(event);
    const factor = Math.exp(-event.deltaY * (event.deltaMode === 1 ? 0.05 : 0.0015));
    const v = state.view;
    v.tx = sx - (sx - v.tx) * factor;
    v.ty = sy - (sy - v.ty) * factor;
    v.scale *= factor;
    drawMap();
  }, { passive: false });

  new ResizeObserver(() => drawMap()).observe(canvas);

  // -- the controls ---------------------------------------------------------------------------
  function updatePreview() {
    const ref = parseQuery($("query").value);
    const preview = $("query-preview");
    preview.replaceChildren();
    if (!ref) return;
    if ("id" in ref) preview.append(`id ${ref.id}`);
    else preview.appendChild(tokenNode(ref.token));
  }

  $("query").addEventListener("input", updatePreview);
  $("search").addEventListener("submit", (event) => {
    event.preventDefault();
    const ref = parseQuery($("query").value);
    if (ref) search(ref);
    else setStatus("type a token's text (a leading space counts: ␣ or a real space) or #id");
  });
  for (const side of ["a", "b"]) {
    $(`metric-${side}`).addEventListener("change", () => {
      $(`legend-${side}`).textContent = metricOf(side);
      if (state.query) search({ id: state.query.id });
    });
  }
  $("k").addEventListener("change", () => state.query && search({ id: state.query.id }));
  window.addEventListener("hashchange", () => { // an edited address (saveLocation itself fires none)
    const ref = readLocation();
    if (ref) search(ref);
  });
  $("reset-view").addEventListener("click", () => {
    resetView();
    drawMap();
  });

  async function start() {
    try {
      state.info = await getJSON("info");
    } catch (error) {
      setStatus(`cannot read info: ${error.message}`);
      return;
    }
    const info = state.info;
    $("store-name").textContent = `${info.store} · ${info.vocab_size.toLocaleString()} ids · ${info.tokenizer.spec || ""}`;
    document.title = `vocabmetric · ${info.store}`;
    $("k").max = String(info.limits.max_k);
    const names = Object.keys(info.metrics);
    const preferred = (choices, fallback) => choices.find((m) => names.includes(m)) || fallback;
    const defaults = { a: preferred(["knn", "l2"], names[0]), b: preferred(["geodesic", "umap", "tree", "l2"], names[1] || names[0]) };
    for (const side of ["a", "b"]) {
      const select = $(`metric-${side}`);
      for (const name of names) {
        const option = document.createElement("option");
        option.value = name;
        const m = info.metrics[name];
        option.textContent = m.k ? `${name} (k ${m.k})` : name;
        select.appendChild(option);
      }
      select.value = defaults[side];
    }
    // an address without a query opens on the store's example token (GET /info), so the
    // page never opens empty
    const initial = readLocation() || (info.example ? { token: info.example.text } : null);
    for (const side of ["a", "b"]) $(`legend-${side}`).textContent = metricOf(side);
    document.body.dataset.state = "ready";
    const map = loadMap().catch((error) => {
      $("map-status").textContent = `no map: ${error.message}`;
      document.body.dataset.map = "missing";
    });
    if (initial) {
      if ("token" in initial) $("query").value = initial.token;
      updatePreview();
      await search(initial);
    }
    await map;
  }

  // for scripted use (and the browser test): where a token is drawn, in CSS px of the canvas
  window.vocabmetricExplorer = {
    screenPosition(id) {
      if (!state.map || id >= state.map.pointOf.length || state.map.pointOf[id] < 0) return null;
      const [x, y] = toScreen(state.map.pointOf[id]);
      return { x, y };
    },
    get query() {
      return state.query;
    },
    search,
  };

  start();
})();
