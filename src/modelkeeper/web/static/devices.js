// Devices: each worker, its memory, and the models on it; live from the event stream.
import { ago, badge, bytes, formText, h, keyValues, modelLink, refresher, seconds, table } from "./dom.js";

// Memory figures move without events: the page refetches when POLL_MS pass without a refresh.
// Everything else arrives as events; these make it refetch (not job.progress: nothing here shows
// it; worker.state is not even subscribed to, see app.js). A burst's kicks settle into one request.
const POLL_MS = 2000;
const SETTLE_MS = 100;
const REFETCH = /^(model|worker|lease|cache)\.|^job\.(queued|running|succeeded|failed|cancelled)$/;

function memoryBar(m) {
  const total = m.total_bytes || m.budget_bytes || 1;
  const models = m.models_bytes || 0;
  const reserved = Math.min(m.reserve_bytes || 0, m.free_bytes || 0);
  const free = Math.max(0, (m.free_bytes || 0) - reserved);
  const other = Math.max(0, total - models - reserved - free);
  const parts = [
    ["models", models],
    ["other", other],
    ["reserved", reserved],
    ["free", free],
  ];
  const bar = h("div", { class: "membar", role: "img", "aria-label": "memory" });
  for (const [name, value] of parts) {
    const seg = h("span", { class: `seg seg-${name}`, title: `${name}: ${bytes(value)}` });
    seg.style.width = `${((100 * value) / total).toFixed(2)}%`; // CSSOM: allowed by the CSP
    bar.append(seg);
  }
  const legend = h(
    "div",
    { class: "legend" },
    parts.map(([name, value]) => h("span", { class: `key key-${name}` }, `${name} ${bytes(value)}`)),
    h("span", { class: "key" }, `budget ${bytes(m.budget_bytes)} of ${bytes(m.total_bytes)}`),
  );
  return [bar, legend];
}

function sources(placement) {
  return Object.entries(placement.sources || {}).map(([component, source]) =>
    h("span", { class: ["chip", `src-${source}`], title: `${component} from ${source}` }, `${component}: ${source}`),
  );
}

function leaseCell(placement, leases) {
  const mine = leases.filter((l) => l.model_id === placement.model_id && (!l.device || l.device === placement.device));
  if (!placement.leases && !mine.length) return "–";
  if (!mine.length) return String(placement.leases);
  return mine.map((l) => h("div", { class: "lease" }, `${l.holder}: expires in ${Math.round(l.expires_in)} s`));
}

function keepCell(placement) {
  // kept loaded (reloaded after a worker restart), and the keep-alive expiry where one is set
  const parts = [];
  if (placement.keep_loaded) parts.push("kept");
  if (placement.expires_at) {
    const left = Math.max(0, Math.round(placement.expires_at - Date.now() / 1000));
    parts.push(`unloads in ${left} s`);
  } else if (placement.keep_alive >= 0 && placement.state === "loaded") {
    parts.push("in use");
  }
  return parts.length ? parts.join(", ") : "–";
}

// A placement sharing parts with others on the device: its bytes count them, the device once.
function sharedNote(placement) {
  if (!placement.shared_bytes) return null;
  const who = Object.entries(placement.shared || {}).map(([c, ids]) => `${c} with ${ids.join(", ")}`);
  return h(
    "div",
    { class: "shared", title: `one module on the device: ${who.join("; ")}` },
    `${bytes(placement.shared_bytes)} shared`,
  );
}

function modelRows(device, leases, ctx, kick) {
  return device.models.map((p) =>
    h(
      "tr",
      { "data-model": p.model_id },
      h("td", null, modelLink(p.model_id, p.name)),
      h("td", null, p.type || "–"),
      h("td", null, badge(p.state, p.state)),
      h("td", { class: "num" }, bytes(p.bytes), sharedNote(p)),
      h("td", { class: "form" }, formText(p)),
      h("td", null, sources(p)),
      h("td", null, leaseCell(p, leases)),
      h("td", { class: "keep" }, keepCell(p)),
      h("td", null, Object.values(p.loras || {}).map((l) => h("div", null, `${l.lora} × ${l.strength}`))),
      h("td", null, p.loaded_at ? ago(p.loaded_at) : "–", p.load_seconds ? ` (${seconds(p.load_seconds)})` : ""),
      h(
        "td",
        null,
        h(
          "button",
          {
            type: "button",
            class: "unload",
            disabled: p.state !== "loaded",
            on: {
              click: async (event) => {
                event.target.disabled = true;
                try {
                  const r = await ctx.api(`/api/model/${encodeURIComponent(p.model_id)}/unload`, {
                    method: "POST",
                    body: { device_id: p.device },
                  });
                  ctx.toast(`unloaded ${p.name} from ${p.device}: ${bytes(r.unloaded?.[0]?.freed_bytes)} freed`);
                } catch (err) {
                  ctx.failed(err);
                }
                kick();
              },
            },
          },
          "Unload",
        ),
      ),
    ),
  );
}

function deviceCard(d, leases, ctx, kick) {
  return h(
    "section",
    { class: "card device", "data-device": d.id },
    h("h2", null, d.id, " ", badge(d.state, d.state), h("span", { class: "muted" }, d.name ? ` ${d.name}` : "")),
    keyValues([
      ["PID", d.pid ?? "–"],
      ["queue", `${d.queued} waiting${d.running ? `, running ${d.running.kind || d.running.id || "one"}` : ""}`],
      ["restarts", String(d.restarts)],
      ["last error", d.last_error || undefined],
    ]),
    memoryBar(d.memory || {}),
    d.models.length
      ? table(
          ["model", "type", "state", "size", "form", "weights from", "leases", "keep", "LoRAs", "loaded", ""],
          modelRows(d, leases, ctx, kick),
          { class: "models" },
        )
      : h("p", { class: "muted empty" }, "No model on this device."),
  );
}

export function mount(root, ctx) {
  const summary = h("div", { class: "summary" });
  const list = h("div", { class: "devices" });
  root.append(h("h1", null, "Devices"), summary, list);
  let leases = [];

  let poll = null;
  const kick = refresher(
    async () => {
      clearTimeout(poll);
      try {
        await draw();
      } finally {
        poll = setTimeout(kick, POLL_MS);
      }
    },
    250,
    ctx.failed,
    { settle: SETTLE_MS },
  );

  async function draw() {
    const status = await ctx.api("/api/model/status");
    const anyLease = status.devices.some((d) => d.models.some((m) => m.leases));
    leases = anyLease ? await ctx.api("/api/leases") : [];
    const c = status.cache || { bytes_used: 0, budget_bytes: 0, segments: 0 }; // null: the cache is off
    summary.replaceChildren(
      h("span", null, status.ready ? badge("ready", "ready") : badge("starting", "loading")),
      h("span", null, `up ${seconds(status.uptime_seconds)}`),
      h("a", { href: "#/cache" }, `RAM cache ${bytes(c.bytes_used)} of ${bytes(c.budget_bytes)} in ${c.segments} segments`),
      h("a", { href: "#/jobs" }, `jobs: ${status.jobs.running} running, ${status.jobs.queued} queued`),
      h("span", null, `leases: ${status.leases}`),
    );
    list.replaceChildren(...status.devices.map((d) => deviceCard(d, leases, ctx, kick)));
  }

  kick();
  return {
    refresh: kick,
    onEvent(type) {
      if (REFETCH.test(type)) kick();
    },
    destroy() {
      clearTimeout(poll);
      kick.stop();
    },
  };
}
