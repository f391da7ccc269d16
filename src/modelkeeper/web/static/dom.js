// DOM building without HTML strings: every text goes in through createTextNode, so whatever a
// model file says (names, metadata, trigger words) is shown as text and never parsed as markup.
// Attributes are set one by one; URLs are only ever built here from encoded ids.

const SVG_NS = "http://www.w3.org/2000/svg";

function fill(el, props, children) {
  for (const [key, value] of Object.entries(props || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "on") {
      for (const [type, fn] of Object.entries(value)) el.addEventListener(type, fn);
    } else if (key === "class") {
      el.setAttribute("class", Array.isArray(value) ? value.filter(Boolean).join(" ") : value);
    } else if (key === "value" || key === "checked" || key === "disabled" || key === "selected") {
      el[key] = value;
    } else if (key.startsWith("on")) {
      throw new Error(`inline handler attribute ${key} is not allowed`);
    } else {
      el.setAttribute(key, value === true ? "" : String(value));
    }
  }
  append(el, children);
  return el;
}

export function append(el, children) {
  for (const child of children.flat(Infinity)) {
    if (child === undefined || child === null || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

/** h("td", {class: "num"}, "text", otherNode): an HTML element. */
export function h(tag, props, ...children) {
  return fill(document.createElement(tag), props, children);
}

/** An SVG element (charts). */
export function s(tag, props, ...children) {
  return fill(document.createElementNS(SVG_NS, tag), props, children);
}

export function modelHref(id) {
  return "#/model/" + encodeURIComponent(id);
}

export function modelLink(id, name) {
  return h("a", { href: modelHref(id) }, name || id);
}

export function bytes(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KB", "MB", "GB", "TB"];
  let v = Number(n);
  let i = 0;
  while (Math.abs(v) >= 1000 && i < units.length - 1) {
    v /= 1000;
    i += 1;
  }
  return `${v.toFixed(i === 0 || v >= 100 ? 0 : 1)} ${units[i]}`;
}

/** A placement's form, in the service's own words (forms.py ``describe``): ``float16``,
 * ``float16, stored as float8_e4m3fn``, ``bfloat16, offload auto``. */
export function formText(p) {
  let text = p.dtype || "–";
  if (p.storage_dtype) text += `, stored as ${p.storage_dtype}`;
  if (p.offload !== undefined && p.offload !== null && p.offload !== "none") {
    text += `, offload ${typeof p.offload === "number" ? bytes(p.offload) : p.offload}`;
  }
  return text;
}

export function seconds(x) {
  if (x === null || x === undefined) return "–";
  if (x < 1) return `${(x * 1000).toFixed(x < 0.01 ? 2 : 0)} ms`;
  return `${x.toFixed(x < 10 ? 2 : 1)} s`;
}

export function when(epoch) {
  if (!epoch) return "–";
  return new Date(epoch * 1000).toLocaleString();
}

export function ago(epoch) {
  if (!epoch) return "–";
  const d = Date.now() / 1000 - epoch;
  if (d < 60) return `${Math.max(0, Math.round(d))} s ago`;
  if (d < 3600) return `${Math.round(d / 60)} min ago`;
  if (d < 86400) return `${Math.round(d / 3600)} h ago`;
  return `${Math.round(d / 86400)} d ago`;
}

export function badge(text, kind) {
  return h("span", { class: ["badge", kind && `badge-${kind}`] }, text);
}

/** A table from column titles and rows of cells (a cell: a node, a string, or [props, ...children]). */
export function table(columns, rows, props) {
  return h(
    "table",
    props,
    h("thead", null, h("tr", null, columns.map((c) => h("th", null, c)))),
    h("tbody", null, rows),
  );
}

export function keyValues(pairs) {
  return h(
    "dl",
    { class: "kv" },
    pairs.filter(([, v]) => v !== undefined).map(([k, v]) => [h("dt", null, k), h("dd", null, v ?? "–")]),
  );
}

export function section(title, ...children) {
  return h("section", { class: "card" }, h("h2", null, title), children);
}

/** A refresh that runs ``load`` at most once per ``gap`` ms, never two at once, and always once
 * more after the last kick: events can arrive in bursts, the page still makes few requests.
 * ``settle`` ms: a kick waits that long before its load, so the kicks of one burst (a load's
 * job, model and cache events come within a few ms) make one request, not two. A hidden tab
 * makes none: its loads wait until it is shown, then one runs (events that are applied in place,
 * like job progress, still are). */
export function refresher(load, gap = 250, onError = console.error, { settle = 0 } = {}) {
  let running = false;
  let pending = false;
  let last = -Infinity;
  let timer = null;
  let dead = false;
  let deferred = false;
  function shown() {
    if (!document.hidden && deferred) {
      deferred = false;
      schedule();
    }
  }
  document.addEventListener("visibilitychange", shown);
  function schedule() {
    if (timer !== null || dead) return;
    timer = setTimeout(run, Math.max(settle, last + gap - performance.now()));
  }
  async function run() {
    timer = null;
    if (dead) return;
    if (document.hidden) {
      deferred = true;
      return;
    }
    if (running) {
      pending = true;
      return;
    }
    pending = false;
    running = true;
    last = performance.now();
    try {
      await load();
    } catch (err) {
      onError(err);
    } finally {
      running = false;
      if (pending) schedule();
    }
  }
  const kick = () => {
    if (running) pending = true;
    else schedule();
  };
  kick.stop = () => {
    dead = true;
    if (timer !== null) clearTimeout(timer);
    document.removeEventListener("visibilitychange", shown);
  };
  return kick;
}

/** The share of a job that is done (0..1), or null when its progress says nothing measurable. */
export function fraction(job) {
  if (job.state === "succeeded") return 1;
  const p = job.progress || {};
  if (p.components) {
    const inner = p.total ? Math.min(1, p.done / p.total) : 0;
    return Math.min(1, (Math.max(0, p.component - 1) + inner) / p.components);
  }
  if (p.total) return Math.min(1, p.done / p.total);
  return null;
}

/** A <progress> and its label for a job, updated in place by ``update``. */
export function jobProgress(job) {
  const bar = h("progress", { max: "1", class: "job-bar" });
  const label = h("span", { class: "job-pct" });
  const box = h("span", { class: "job-progress" }, bar, label);
  let shown = 0; // a bar never goes back: a job's progress report may lag behind its step
  const update = (info) => {
    const measured = fraction(info);
    const f = measured === null ? null : Math.max(shown, measured);
    if (f === null && !shown) {
      bar.removeAttribute("value");
      label.textContent = info.state === "running" ? "…" : "";
    } else {
      shown = f ?? shown;
      bar.setAttribute("value", shown.toFixed(3));
      label.textContent = `${Math.round(shown * 100)}%`;
    }
    box.dataset.state = info.state;
  };
  update(job);
  return { node: box, update };
}
