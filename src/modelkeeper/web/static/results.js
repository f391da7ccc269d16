// What an action found, shown next to it when its job finishes: a validation passed or failed
// (and which checks, with their message), a benchmark's time per step, where a load put the
// model; a failed or refused action's message. From the job's own result (the job.* event carries
// it), never a second request. Every text goes in as text (dom.js).
import { bytes, formText, h, seconds } from "./dom.js";

function count(n, noun) {
  return `${n} ${noun}${n === 1 ? "" : "s"}`;
}

function perDevice(result) {
  if (Array.isArray(result)) return result;
  if (result && Array.isArray(result.placements)) return result.placements;
  return result ? [result] : [];
}

function validation(result) {
  const lines = [];
  let passed = true;
  for (const entry of perDevice(result)) {
    const comps = Object.entries(entry.components || {});
    const failed = comps.filter(([, c]) => !c.passed);
    passed &&= failed.length === 0;
    const level = comps[0]?.[1]?.level;
    lines.push(
      h(
        "div",
        { class: "result-head" },
        `${failed.length ? "failed" : "passed"} on ${entry.device}${level ? ` (${level})` : ""}: `,
        failed.length ? `${failed.length} of ${count(comps.length, "component")} failed` : `${count(comps.length, "component")} passed`,
      ),
    );
    for (const [name, c] of failed) {
      const checks = (c.checks || []).filter((k) => !k.passed);
      const why = checks.length ? checks.map((k) => `${k.name}: ${k.detail || "failed"}`).join("; ") : c.error || "failed";
      lines.push(h("div", { class: "result-detail", "data-component": name }, `${name}: ${why}`));
    }
  }
  return { state: passed ? "passed" : "failed", lines };
}

function benchmark(result) {
  const lines = [];
  for (const entry of perDevice(result)) {
    lines.push(h("div", { class: "result-head" }, `on ${entry.device}, median time per step:`));
    for (const [name, c] of Object.entries(entry.components || {})) {
      const figures = (c.figures || []).map((f) => {
        const ms = f.median_s * 1000;
        return `${f.part} ${ms.toFixed(ms < 10 ? 2 : 1)} ms/step`;
      });
      lines.push(h("div", { class: "result-detail", "data-component": name }, `${name}: ${figures.join(", ") || c.error || "–"}`));
    }
  }
  return { state: "succeeded", lines };
}

function load(result) {
  return {
    state: "succeeded",
    lines: perDevice(result).map((p) =>
      h(
        "div",
        { class: "result-head" },
        p.already_loaded ? `already loaded on ${p.device}` : `loaded on ${p.device} in ${seconds(p.load_seconds)}`,
        `: ${bytes(p.bytes)}, ${formText(p)}`,
        p.reloaded ? ` (reloaded: was ${formText(p.reloaded)})` : "",
      ),
    ),
  };
}

function unload(result) {
  const gone = result?.unloaded || [];
  return {
    state: "succeeded",
    lines: gone.length
      ? gone.map((u) => h("div", { class: "result-head" }, `unloaded from ${u.device}: ${bytes(u.freed_bytes)} freed`))
      : [h("div", { class: "result-head" }, "it was loaded nowhere")],
  };
}

const SUMMARIES = { validate: validation, benchmark, load, unload };

/** The node for a finished job's ``info`` (state, result, error) of action ``label``. */
export function jobOutcome(label, info) {
  if (info.state !== "succeeded") {
    const why = info.error ? info.error.error || info.error.error_code || "" : "";
    return outcome(label, info.state, [h("div", { class: "result-head" }, why)], info.id);
  }
  const summarise = SUMMARIES[label];
  const { state, lines } = summarise ? summarise(info.result) : { state: "succeeded", lines: [] };
  return outcome(label, state, lines, info.id);
}

/** The node for an action the service refused before any job (an ApiError). */
export function refusal(label, err) {
  return outcome(label, "failed", [h("div", { class: "result-head" }, err.message || String(err))]);
}

function outcome(label, state, lines, jobId) {
  return h(
    "div",
    { class: "result", "data-action": label, "data-state": state },
    h("span", { class: ["badge", `badge-${state}`] }, `${label} ${state}`),
    h("div", { class: "result-lines" }, lines),
    jobId ? h("span", { class: "mono muted job-id" }, jobId) : null,
  );
}
