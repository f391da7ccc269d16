// One model: what it is, where it is, what happened to it; actions and metadata editing.
import { modelPath } from "./api.js";
import { ago, badge, bytes, formText, h, jobProgress, keyValues, refresher, seconds, section, table, when } from "./dom.js";
import { historyChart } from "./chart.js";
import { loadOptions } from "./loadform.js";
import { jobOutcome, refusal } from "./results.js";

const PATCHABLE = new Set(["main", "unet", "transformer"]);
const FINISHED = new Set(["succeeded", "failed", "cancelled"]);

function list(text) {
  return text.split(",").map((t) => t.trim()).filter(Boolean);
}

function summary(entry) {
  const d = entry.data || {};
  if (entry.op === "load") return `${d.device}: ${seconds(d.seconds)}, ${bytes(d.bytes)}`;
  if (entry.op === "validate") {
    const comps = Object.entries(d.components || {});
    const failed = comps.filter(([, c]) => !c.passed).map(([n]) => n);
    return `${d.device}: ${failed.length ? `failed ${failed.join(", ")}` : `${comps.length} passed`}`;
  }
  if (entry.op === "benchmark") {
    return `${d.device}: ` + Object.entries(d.components || {}).map(([n, c]) => `${n} ${seconds(c.figures?.[0]?.median_s)}`).join(", ");
  }
  return Object.entries(d).map(([k, v]) => `${k} ${typeof v === "object" ? JSON.stringify(v) : v}`).join(", ");
}

export function mount(root, ctx, id) {
  const head = h("div", { class: "model-head" });
  const actions = h("section", { class: "card actions" });
  const where = h("div");
  const loras = h("div");
  const history = h("div");
  const meta = h("div");
  const facts = h("div", { class: "facts" });
  root.append(head, actions, where, loras, history, meta, facts);
  let detail = null;
  let tracked = null; // {id, progress, label}
  let builtOnce = false;

  const jobLine = h("div", { class: "job-line" });
  const resultLine = h("div", { class: "job-result", "aria-live": "polite" });
  const conflict = h("div", { class: "load-conflict", role: "alert", hidden: true });
  // finished jobs seen on the stream, kept a moment: a quick job may end before its POST answers
  const finished = new Map();

  function finish(label, info) {
    tracked = null;
    jobLine.replaceChildren(); // the outcome below names the job
    resultLine.replaceChildren(jobOutcome(label, info));
    if (label === "load" && info.state === "failed" && info.error?.error_code === "ALREADY_LOADED") {
      offerReload(info.error.error, lastLoad);
    }
    kick();
  }

  function refused(label, err, body) {
    if (err?.status === 401) return ctx.failed(err); // the token prompt is showing
    if (label === "load" && err?.code === "ALREADY_LOADED") offerReload(err.message, body);
    else resultLine.replaceChildren(refusal(label, err));
  }

  // 409 ALREADY_LOADED: the model is loaded in another form; say so, and offer the reload
  function offerReload(message, body) {
    conflict.replaceChildren(
      h("span", { class: "message" }, message),
      h(
        "button",
        {
          type: "button",
          class: "reload",
          on: {
            click: () => {
              conflict.hidden = true;
              run("load", "/load", { ...body, reload: true });
            },
          },
        },
        "Reload in this form",
      ),
    );
    conflict.hidden = false;
  }

  let lastLoad = {};
  async function run(label, path, body) {
    conflict.hidden = true;
    resultLine.replaceChildren();
    if (label === "load") lastLoad = body;
    try {
      const answer = await ctx.api(modelPath(detail.id, path), { method: "POST", body: { ...body, wait_for_completion: false } });
      const job = answer.job;
      if (!job || answer.result !== undefined || FINISHED.has(job.state) || finished.has(job.id)) {
        const info = finished.get(job?.id) || { ...(job || {}), state: job ? job.state : "succeeded", result: answer.result ?? job?.result };
        finish(label, info);
        return;
      }
      const progress = jobProgress(job);
      tracked = { id: job.id, progress, label };
      jobLine.replaceChildren(h("span", null, `${label} `), progress.node, h("span", { class: "mono muted" }, ` ${job.id}`));
    } catch (err) {
      refused(label, err, body);
    }
  }

  function buildActions(devices) {
    const device = h(
      "select",
      { name: "device" },
      h("option", { value: "" }, "placement chooses"),
      devices.map((d) => h("option", { value: d.id }, `${d.id}${d.name ? ` (${d.name})` : ""}`)),
    );
    const keep = h("input", { type: "checkbox", name: "keep_loaded" });
    const options = loadOptions();
    const level = h("select", { name: "level" }, ["header", "weights", "functional"].map((l) => h("option", { value: l }, l)));
    const dev = () => device.value || undefined;
    const button = (text, cls, fn) => h("button", { type: "button", class: cls, on: { click: fn } }, text);
    const load = () => {
      const more = options.read();
      if (more) run("load", "/load", { device_id: dev(), keep_loaded: keep.checked, ...more });
    };
    actions.replaceChildren(
      h("h2", null, "Actions"),
      h(
        "div",
        { class: "row" },
        h("label", null, "Device ", device),
        h("label", { class: "check" }, keep, "keep loaded"),
        button("Load", "load", load),
        button("Unload", "unload", async () => {
          conflict.hidden = true;
          try {
            const r = await ctx.api(modelPath(detail.id, "/unload"), { method: "POST", body: { device_id: dev() } });
            resultLine.replaceChildren(jobOutcome("unload", { state: "succeeded", result: r }));
          } catch (err) {
            refused("unload", err);
          }
          kick();
        }),
        h("label", null, "Level ", level),
        button("Validate", "validate", () => run("validate", "/validate", { device_id: dev(), level: level.value })),
        button("Benchmark", "benchmark", () => run("benchmark", "/benchmark", { device_id: dev(), steps: 5, warmup: 1 })),
      ),
      options.node,
      conflict,
      jobLine,
      resultLine,
    );
  }

  function buildLoraPicker(candidates) {
    const pick = h("select", { name: "lora" }, candidates.map((l) => h("option", { value: l.id }, `${l.name} (${l.base})`)));
    const strength = h("input", { type: "range", name: "strength", min: "-2", max: "2", step: "0.05", value: "1" });
    const shown = h("output", null, "1.00");
    strength.addEventListener("input", () => {
      shown.textContent = Number(strength.value).toFixed(2);
    });
    const apply = h(
      "button",
      {
        type: "button",
        class: "apply-lora",
        disabled: !candidates.length,
        on: {
          click: async () => {
            try {
              const r = await ctx.api(modelPath(detail.id, "/lora"), {
                method: "POST",
                body: { lora_id: pick.value, strength: Number(strength.value) },
              });
              ctx.toast(`LoRA applied on ${(r.applied || r.devices || []).length || "every"} placement(s)`);
            } catch (err) {
              ctx.failed(err);
            }
            kick();
          },
        },
      },
      "Apply",
    );
    return h(
      "div",
      { class: "row" },
      h("label", null, "LoRA ", pick),
      h("label", null, "Strength ", strength, shown),
      apply,
      candidates.length ? null : h("span", { class: "muted" }, "no registered LoRA for this base"),
    );
  }

  function appliedLoras(placements) {
    const rows = [];
    for (const p of placements) {
      for (const [loraId, l] of Object.entries(p.loras || {})) {
        const slider = h("input", { type: "range", min: "-2", max: "2", step: "0.05", value: String(l.strength) });
        const shown = h("output", null, Number(l.strength).toFixed(2));
        slider.addEventListener("input", () => {
          shown.textContent = Number(slider.value).toFixed(2);
        });
        slider.addEventListener("change", async () => {
          try {
            await ctx.api(modelPath(detail.id, `/lora/${encodeURIComponent(loraId)}`), {
              method: "PUT",
              body: { strength: Number(slider.value), device_id: p.device },
            });
          } catch (err) {
            ctx.failed(err);
          }
          kick();
        });
        const remove = h(
          "button",
          {
            type: "button",
            class: "remove-lora",
            on: {
              click: async () => {
                try {
                  await ctx.api(modelPath(detail.id, `/lora/${encodeURIComponent(loraId)}`), {
                    method: "DELETE",
                    query: { device_id: p.device },
                  });
                } catch (err) {
                  ctx.failed(err);
                }
                kick();
              },
            },
          },
          "Remove",
        );
        rows.push(h("tr", { "data-lora": loraId }, h("td", null, p.device), h("td", null, l.lora || l.name), h("td", null, slider, shown), h("td", null, remove)));
      }
    }
    return rows.length ? table(["device", "LoRA", "strength", ""], rows, { class: "loras" }) : h("p", { class: "muted" }, "No LoRA applied.");
  }

  function buildMetaForm(m) {
    const field = (name, label, value, multi = false) =>
      h("label", null, label, multi ? h("textarea", { name, rows: "3", value: value ?? "" }) : h("input", { name, type: "text", value: value ?? "" }));
    const form = h(
      "form",
      { class: "meta-form" },
      field("name", "Name", detail.name),
      field("description", "Description", detail.meta.description, true),
      field("tags", "Tags (comma separated)", (detail.meta.tags || []).join(", ")),
      field("trigger_words", "Trigger words (comma separated)", (detail.meta.trigger_words || []).join(", ")),
      field("source_url", "Source URL", detail.meta.source_url),
      field("license", "License", detail.meta.license),
      h("button", { type: "submit" }, "Save metadata"),
    );
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      const data = new FormData(form);
      const values = {
        name: String(data.get("name")).trim() || undefined,
        description: String(data.get("description")),
        tags: list(String(data.get("tags"))),
        trigger_words: list(String(data.get("trigger_words"))),
        source_url: String(data.get("source_url")).trim() || null,
        license: String(data.get("license")).trim() || null,
      };
      try {
        await ctx.api(modelPath(detail.id, "/metadata"), { method: "PUT", body: values });
        ctx.toast("metadata saved");
      } catch (err) {
        ctx.failed(err);
      }
      kick();
    });
    return form;
  }

  function render(d, status) {
    const placements = d.state?.vram || [];
    head.replaceChildren(
      h("h1", null, d.name, " ", h("span", { class: "mono muted" }, d.id)),
      h(
        "div",
        { class: "badges" },
        badge(d.type),
        badge(d.base),
        d.variant && d.variant !== "normal" ? badge(d.variant) : null,
        badge(d.format),
        d.status === "ok" ? null : badge(d.status, "failed"),
        placements.map((p) => badge(`${p.state} on ${p.device}`, p.state)),
      ),
      h("p", { class: "path" }, d.file?.path || ""),
    );
    const tiers = d.state || {};
    where.replaceChildren(
      section(
        "Where it is",
        keyValues([
          ["disk", `${tiers.disk?.status || d.status}, ${bytes(tiers.disk?.bytes ?? d.size)}`],
          ["RAM cache", tiers.ram?.length ? `${tiers.ram.length} segment(s), ${bytes(tiers.ram.reduce((a, r) => a + r.bytes, 0))}` : "not cached"],
        ]),
        placements.length
          ? table(
              ["device", "state", "size", "form", "weights from", "load", "leases", "loaded"],
              placements.map((p) =>
                h(
                  "tr",
                  { "data-device": p.device },
                  h("td", null, p.device),
                  h("td", null, badge(p.state, p.state)),
                  h("td", { class: "num" }, bytes(p.bytes)),
                  h("td", { class: "form" }, formText(p)),
                  h("td", null, Object.entries(p.sources || {}).map(([c, src]) => h("span", { class: ["chip", `src-${src}`] }, `${c}: ${src}`))),
                  h("td", null, seconds(p.load_seconds)),
                  h("td", null, String(p.leases ?? 0)),
                  h("td", null, ago(p.loaded_at)),
                ),
              ),
              { class: "placements" },
            )
          : h("p", { class: "muted", "data-empty": "vram" }, "Not loaded on any device."),
        (tiers.failed || []).map((f) => h("p", { class: "error" }, `failed on ${f.device}: ${f.error?.error || f.error || ""}`)),
      ),
    );
    history.replaceChildren(
      section(
        "History",
        historyChart(d.history || []),
        table(
          ["when", "operation", "what"],
          (d.history || []).map((e) => h("tr", null, h("td", null, when(e.at)), h("td", null, e.op), h("td", null, summary(e)))),
          { class: "history" },
        ),
      ),
    );
    const m = d.meta || {};
    meta.replaceChildren(
      section(
        "Metadata",
        h(
          "div",
          { class: "two" },
          h(
            "div",
            { class: "meta-view" },
            keyValues([
              ["name", d.name],
              ["description", m.description || "–"],
              ["tags", (m.tags || []).length ? (m.tags || []).map((t) => h("span", { class: "chip" }, t)) : "–"],
              ["trigger words", (m.trigger_words || []).length ? (m.trigger_words || []).map((t) => h("span", { class: "chip" }, t)) : "–"],
              ["source", m.source_url || "–"],
              ["license", m.license || "–"],
              ["default settings", Object.keys(m.default_settings || {}).length ? JSON.stringify(m.default_settings) : "–"],
            ]),
            Object.keys(m.found || {}).length
              ? [h("h3", null, "From the file and its sidecars"), keyValues(Object.entries(m.found).map(([k, v]) => [k, typeof v === "string" ? v : JSON.stringify(v)]))]
              : null,
          ),
          builtOnce ? meta.querySelector("form.meta-form") : buildMetaForm(d),
        ),
      ),
    );
    const hashes = d.file?.hashes || {};
    facts.replaceChildren(
      section(
        "File and hashes",
        keyValues([
          ["path", d.file?.path],
          ["size", bytes(d.size)],
          ["BLAKE3", hashes.blake3 || "not yet"],
          ["SHA-256", hashes.sha256 || "not computed"],
          ["AutoV2", hashes.autov2 || "not computed"],
          ["first seen", when(d.file?.first_seen)],
        ]),
      ),
      section(
        "Components",
        table(
          ["name", "kind", "base", "encoder", "tensors", "parameters", "size", "dtypes", "content id"],
          (d.components || []).map((c) =>
            h(
              "tr",
              null,
              h("td", null, c.name),
              h("td", null, c.kind),
              h("td", null, c.base || "–"),
              h("td", null, c.encoder || "–"),
              h("td", { class: "num" }, String(c.tensor_count ?? "–")),
              h("td", { class: "num" }, c.parameters?.toLocaleString() ?? "–"),
              h("td", { class: "num" }, bytes(c.bytes)),
              h("td", null, Object.entries(c.dtypes || {}).map(([k, v]) => `${k} ${v}`).join(", ")),
              h("td", { class: "mono", title: c.content_id || "" }, (c.content_id || "–").slice(0, 16)),
            ),
          ),
          { class: "components" },
        ),
      ),
      section(
        "Identification",
        keyValues([
          ["rule", d.identification?.rule],
          ["confidence", String(d.identification?.confidence ?? "–")],
          ...Object.entries(d.identification?.evidence || {}).map(([k, v]) => [k, typeof v === "string" ? v : JSON.stringify(v)]),
        ]),
      ),
    );
    if (!builtOnce) {
      buildActions(status.devices);
      builtOnce = true;
    }
    if (PATCHABLE.has(d.type)) {
      const picker = loras.querySelector(".lora-picker");
      loras.replaceChildren(section("LoRA", picker || h("div", { class: "lora-picker" }), appliedLoras(placements)));
      if (!picker) {
        ctx.api("/api/model", { query: { type: "lora", base: d.base, limit: 200 } }).then(
          (page) => loras.querySelector(".lora-picker")?.replaceChildren(buildLoraPicker(page.items)),
          ctx.failed,
        );
      }
    }
  }

  let status = null;
  const kick = refresher(async () => {
    const [d, st] = await Promise.all([ctx.api(modelPath(id)), status ? Promise.resolve(status) : ctx.api("/api/model/status")]);
    detail = d;
    status = st;
    render(d, st);
  }, 250, (err) => {
    if (err?.status === 404 && !detail) head.replaceChildren(h("h1", null, "No such model"), h("p", { class: "muted" }, err.message));
    else ctx.failed(err);
  });
  kick();

  // after a gap in the stream: the page, and the tracked job in case its end was missed
  async function catchUp() {
    kick();
    if (!tracked) return;
    const { id: jobId, label } = tracked;
    try {
      const info = await ctx.api(`/api/jobs/${encodeURIComponent(jobId)}`);
      if (tracked?.id === jobId && FINISHED.has(info.state)) finish(label, info);
    } catch (err) {
      ctx.failed(err);
    }
  }

  return {
    refresh: catchUp,
    onEvent(type, data) {
      if (data.job && FINISHED.has(data.info?.state)) {
        finished.set(data.job, data.info);
        if (finished.size > 32) finished.delete(finished.keys().next().value);
      }
      if (tracked && data.job === tracked.id) {
        const info = data.info || { state: "running", progress: data.progress };
        tracked.progress.update(info);
        if (FINISHED.has(info.state)) finish(tracked.label, info);
      }
      if (detail && data.model_id === detail.id) kick();
    },
    destroy: () => kick.stop(),
  };
}
