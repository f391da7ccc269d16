// Jobs: the recent ones, their progress moved by job.progress events in place (no request per event).
import { ago, badge, h, jobProgress, refresher, seconds } from "./dom.js";

const LIMIT = 50;
const FINISHED = new Set(["succeeded", "failed", "cancelled"]);

function target(job) {
  const p = job.params || {};
  if (p.name || p.model_id) return p.name || p.model_id;
  if (p.roots) return p.roots.join(", ");
  return "–";
}

export function mount(root, ctx) {
  const body = h("tbody");
  const rows = new Map(); // job id -> {row, progress, update}
  root.append(
    h("h1", null, "Jobs"),
    h(
      "section",
      { class: "card" },
      h(
        "table",
        { class: "jobs" },
        h("thead", null, h("tr", null, ["job", "kind", "target", "state", "progress", "created", "took", "error", ""].map((c) => h("th", null, c)))),
        body,
      ),
    ),
  );

  function cancelButton(job) {
    return h(
      "button",
      {
        type: "button",
        class: "cancel",
        hidden: FINISHED.has(job.state),
        on: {
          click: async (event) => {
            event.target.disabled = true;
            try {
              place(await ctx.api(`/api/jobs/${encodeURIComponent(job.id)}`, { method: "DELETE" }));
            } catch (err) {
              ctx.failed(err);
            }
          },
        },
      },
      "Cancel",
    );
  }

  function fillRow(entry, job) {
    // A finished job stays finished: a progress event the worker sent before it saw the cancel, or a
    // listing fetched before the job ended, can arrive after its end and must not revive it.
    if (entry.job && FINISHED.has(entry.job.state) && !FINISHED.has(job.state)) return;
    entry.job = job;
    entry.progress.update(job);
    const took = job.finished_at && job.started_at ? seconds(job.finished_at - job.started_at) : "–";
    entry.state.replaceChildren(badge(job.state, job.state));
    entry.took.textContent = took;
    entry.error.textContent = job.error ? job.error.error || job.error.message || JSON.stringify(job.error) : "";
    entry.cancel.hidden = FINISHED.has(job.state);
    entry.row.dataset.state = job.state;
  }

  function place(job, top = true) {
    let entry = rows.get(job.id);
    if (!entry) {
      const progress = jobProgress(job);
      entry = {
        progress,
        state: h("td"),
        took: h("td"),
        error: h("td", { class: "error-text" }),
        cancel: cancelButton(job),
      };
      entry.row = h(
        "tr",
        { "data-job": job.id },
        h("td", { class: "mono" }, job.id),
        h("td", null, job.kind),
        h("td", null, target(job)),
        entry.state,
        h("td", null, progress.node),
        h("td", null, ago(job.created_at)),
        entry.took,
        entry.error,
        h("td", null, entry.cancel),
      );
      rows.set(job.id, entry);
      if (top) body.prepend(entry.row);
      else body.append(entry.row);
      while (rows.size > LIMIT * 2) {
        const last = body.lastElementChild;
        rows.delete(last.dataset.job);
        last.remove();
      }
    }
    fillRow(entry, job);
  }

  const kick = refresher(async () => {
    const list = await ctx.api("/api/jobs", { query: { limit: LIMIT } });
    for (const job of list.slice().reverse()) place(job);
  }, 250, ctx.failed);
  kick();
  return {
    refresh: kick,
    onEvent(type, data) {
      if (!type.startsWith("job.")) return;
      if (data.info) place(data.info);
      else if (type === "job.progress" && rows.has(data.job)) {
        const entry = rows.get(data.job);
        fillRow(entry, { ...entry.job, state: "running", progress: data.progress });
      } else kick();
    },
    destroy: () => kick.stop(),
  };
}
