// The library: the registry, searched and filtered on the server, a page at a time (limit/offset),
// so 10,000 models cost one page of rows.
import { badge, bytes, h, modelLink, refresher, table } from "./dom.js";

const SIZES = ["10", "25", "50", "100", "200"];
const remembered = { limit: "50", query: "", type: "", base: "", format: "", tag: "", status: "ok", sort: "name", descending: false, offset: 0 };
let vocabulary = null;

function select(name, choices, value, label) {
  return h(
    "label",
    null,
    label,
    h(
      "select",
      { name },
      h("option", { value: "" }, "any"),
      choices.map((c) => h("option", { value: c, selected: c === value }, c)),
    ),
  );
}

export function mount(root, ctx) {
  const state = remembered; // kept across visits in this tab
  const form = h("form", { class: "filters", role: "search" });
  const results = h("div", { class: "results" });
  const pager = h("div", { class: "pager" });
  root.append(h("h1", null, "Library"), form, h("section", { class: "card" }, results, pager));

  async function buildForm() {
    vocabulary ??= await ctx.api("/ui/vocabulary.json");
    form.replaceChildren(
      h("label", null, "Search", h("input", { name: "query", type: "search", value: state.query, placeholder: "name, path, tag, trigger word…" })),
      select("type", vocabulary.type, state.type, "Type"),
      select("base", vocabulary.base, state.base, "Base"),
      select("format", vocabulary.format, state.format, "Format"),
      h("label", null, "Tag", h("input", { name: "tag", type: "text", value: state.tag })),
      h(
        "label",
        null,
        "Status",
        h("select", { name: "status" }, ["ok", "missing", "all"].map((c) => h("option", { value: c, selected: c === state.status }, c))),
      ),
      h(
        "label",
        null,
        "Sort",
        h("select", { name: "sort" }, ["name", "type", "base", "size", "created", "updated"].map((c) => h("option", { value: c, selected: c === state.sort }, c))),
      ),
      h("label", { class: "check" }, h("input", { name: "descending", type: "checkbox", checked: state.descending }), "descending"),
      h(
        "label",
        null,
        "Per page",
        h("select", { name: "limit" }, [...new Set([state.limit, ...SIZES])].map((c) => h("option", { value: c, selected: c === state.limit }, c))),
      ),
    );
  }

  let typing = null;
  function changed() {
    const data = new FormData(form);
    for (const key of ["query", "type", "base", "format", "tag", "status", "sort", "limit"]) state[key] = String(data.get(key) ?? "").trim();
    state.descending = data.get("descending") !== null;
    state.offset = 0;
    kick();
  }
  form.addEventListener("submit", (e) => e.preventDefault());
  form.addEventListener("change", changed);
  form.addEventListener("input", (e) => {
    if (e.target.type !== "search" && e.target.type !== "text") return;
    clearTimeout(typing);
    typing = setTimeout(changed, 200); // one request per pause in typing, not per key
  });

  function page(delta) {
    return h(
      "button",
      {
        type: "button",
        class: delta < 0 ? "prev" : "next",
        on: {
          click: () => {
            state.offset = Math.max(0, state.offset + delta * Number(state.limit));
            kick();
          },
        },
      },
      delta < 0 ? "← Previous" : "Next →",
    );
  }

  const kick = refresher(async () => {
    const query = { ...state, descending: state.descending ? "true" : undefined };
    const data = await ctx.api("/api/model", { query });
    const rows = data.items.map((m) =>
      h(
        "tr",
        { "data-model": m.id },
        h("td", null, modelLink(m.id, m.name)),
        h("td", null, m.type),
        h("td", null, m.base),
        h("td", null, m.format),
        h("td", { class: "num" }, bytes(m.size)),
        h("td", null, (m.tags || []).map((t) => h("span", { class: "chip" }, t))),
        h("td", null, m.status === "ok" ? "ok" : badge(m.status, "failed")),
        h("td", null, (m.loaded_on || []).map((d) => badge(d, "loaded"))),
      ),
    );
    results.replaceChildren(
      rows.length
        ? table(["name", "type", "base", "format", "size", "tags", "file", "loaded on"], rows, { class: "library" })
        : h("p", { class: "muted empty" }, "No model matches."),
    );
    const first = data.total ? data.offset + 1 : 0;
    const last = data.offset + data.items.length;
    const prev = page(-1);
    const next = page(1);
    prev.disabled = data.offset === 0;
    next.disabled = last >= data.total;
    pager.replaceChildren(prev, h("span", { class: "count" }, `${first}–${last} of ${data.total}`), next);
  }, 150, ctx.failed);

  buildForm().then(kick, ctx.failed);
  return {
    refresh: kick,
    onEvent(type) {
      if (type === "model.loaded" || type === "model.unloaded" || type === "registry.scanned") kick();
    },
    destroy: () => kick.stop(),
  };
}
