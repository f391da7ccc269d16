// The RAM cache: its totals and every segment, refreshed on cache events.
import { ago, bytes, h, keyValues, modelLink, refresher, seconds, section, table } from "./dom.js";

export function mount(root, ctx) {
  const stats = h("div");
  const segments = h("div");
  root.append(h("h1", null, "RAM cache"), stats, segments);

  const kick = refresher(async () => {
    const data = await ctx.api("/api/model/cache");
    const st = data.stats;
    stats.replaceChildren(
      section(
        "Totals",
        keyValues([
          ["used", `${bytes(st.bytes_used)} of ${bytes(st.budget_bytes)}`],
          ["segments", String(st.segments)],
          ["hits / misses", `${st.hits} / ${st.misses} (hit rate ${(100 * (st.hit_rate || 0)).toFixed(0)}%)`],
          ["evictions", `${st.evictions} (${bytes(st.evicted_bytes)})`],
          ["shared memory", st.shm_dir],
        ]),
      ),
    );
    const rows = data.segments.map((seg) =>
      h(
        "tr",
        { "data-segment": seg.component_id },
        h("td", { class: "mono", title: seg.component_id }, seg.component_id.slice(0, 12)),
        h("td", { class: "path", title: seg.source }, seg.source),
        h("td", { class: "num" }, bytes(seg.bytes)),
        h("td", { class: "num" }, String(seg.hits)),
        h("td", null, seg.pinned ? "pinned" : "–"),
        h("td", null, seg.models.map((m) => h("div", null, modelLink(m)))),
        h("td", null, seconds(seg.fill_seconds)),
        h("td", null, ago(seg.last_used)),
        h(
          "td",
          null,
          h(
            "button",
            {
              type: "button",
              on: {
                click: async () => {
                  try {
                    await ctx.api(`/api/model/cache/${encodeURIComponent(seg.component_id)}`, { method: "DELETE" });
                  } catch (err) {
                    ctx.failed(err);
                  }
                  kick();
                },
              },
            },
            "Drop",
          ),
        ),
      ),
    );
    segments.replaceChildren(
      section(
        `Segments (${data.segments.length})`,
        rows.length
          ? table(["component", "source", "size", "hits", "pin", "models", "fill", "last use", ""], rows, { class: "segments" })
          : h("p", { class: "muted empty" }, "The cache is empty."),
      ),
    );
  }, 250, ctx.failed);
  kick();
  return {
    refresh: kick,
    onEvent(type) {
      if (type.startsWith("cache.") || type === "model.loaded" || type === "model.unloaded") kick();
    },
    destroy: () => kick.stop(),
  };
}
