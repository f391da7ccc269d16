// The history of a model as a small SVG chart: load times, benchmark medians, validations.
import { h, s, seconds } from "./dom.js";

const W = 640;
const H = 160;
const PAD = { left: 56, right: 12, top: 12, bottom: 24 };

function value(entry) {
  const d = entry.data || {};
  if (entry.op === "load") return d.seconds;
  if (entry.op === "benchmark") {
    return Object.values(d.components || {}).reduce((a, c) => a + (c.figures?.[0]?.median_s || 0), 0);
  }
  if (entry.op === "validate") {
    return Object.values(d.components || {}).reduce((a, c) => a + (c.seconds || 0), 0);
  }
  return null;
}

export function historyChart(entries) {
  const points = entries
    .map((e) => ({ op: e.op, at: e.at, v: value(e), ok: e.op !== "validate" || Object.values(e.data?.components || {}).every((c) => c.passed) }))
    .filter((p) => typeof p.v === "number")
    .sort((a, b) => a.at - b.at);
  if (!points.length) return h("p", { class: "muted" }, "No load, validation or benchmark yet.");
  const t0 = points[0].at;
  const t1 = points[points.length - 1].at;
  const vmax = Math.max(...points.map((p) => p.v)) || 1;
  const x = (t) => PAD.left + (t1 > t0 ? ((t - t0) / (t1 - t0)) * (W - PAD.left - PAD.right) : (W - PAD.left - PAD.right) / 2);
  const y = (v) => H - PAD.bottom - (v / vmax) * (H - PAD.top - PAD.bottom);
  const svg = s("svg", { viewBox: `0 0 ${W} ${H}`, class: "chart", role: "img", "aria-label": "history of loads, validations and benchmarks" });
  svg.append(
    s("line", { x1: PAD.left, y1: H - PAD.bottom, x2: W - PAD.right, y2: H - PAD.bottom, class: "axis" }),
    s("line", { x1: PAD.left, y1: PAD.top, x2: PAD.left, y2: H - PAD.bottom, class: "axis" }),
    s("text", { x: PAD.left - 6, y: PAD.top + 8, class: "tick", "text-anchor": "end" }, seconds(vmax)),
    s("text", { x: PAD.left - 6, y: H - PAD.bottom, class: "tick", "text-anchor": "end" }, "0"),
  );
  for (const op of ["load", "benchmark", "validate"]) {
    const mine = points.filter((p) => p.op === op);
    if (mine.length > 1) {
      svg.append(s("polyline", { points: mine.map((p) => `${x(p.at).toFixed(1)},${y(p.v).toFixed(1)}`).join(" "), class: `line op-${op}` }));
    }
    for (const p of mine) {
      svg.append(
        s("circle", { cx: x(p.at).toFixed(1), cy: y(p.v).toFixed(1), r: 4, class: ["dot", `op-${op}`, p.ok ? null : "bad"] },
          s("title", null, `${op} ${seconds(p.v)} at ${new Date(p.at * 1000).toLocaleString()}`)),
      );
    }
  }
  const legend = h(
    "div",
    { class: "legend" },
    ["load", "benchmark", "validate"].map((op) => h("span", { class: ["key", `op-${op}`] }, op === "benchmark" ? "benchmark (median)" : `${op} (s)`)),
  );
  return h("div", { class: "chart-box" }, svg, legend);
}
