// The dashboard shell: hash routes to views, the token prompt, one event stream for every view.
import { api, EventStream, forgetToken, hasToken, onUnauthorized, setToken } from "./api.js";
import { h } from "./dom.js";
import * as cache from "./cache.js";
import * as devices from "./devices.js";
import * as jobs from "./jobs.js";
import * as library from "./library.js";
import * as model from "./model.js";
import * as notFound from "./notfound.js";

const ROUTES = { "": devices, devices, cache, jobs, library, model }; // #/devices: the same page as #/
const view = document.getElementById("view");
const live = document.getElementById("live");
const login = document.getElementById("login");
const forget = document.getElementById("forget");
let current = null;
let locked = false;

function toast(message, kind = "info") {
  const box = document.getElementById("toasts");
  const note = h("div", { class: ["toast", `toast-${kind}`], role: kind === "error" ? "alert" : "status" }, message);
  box.append(note);
  setTimeout(() => note.remove(), kind === "error" ? 8000 : 4000);
}

function failed(err) {
  if (err?.status === 401) return; // the token prompt is showing
  toast(err?.message || String(err), "error");
}

const ctx = { api, toast, failed };

function setLive(state) {
  live.dataset.state = state;
  live.textContent = { live: "live", retrying: "reconnecting", locked: "locked", connecting: "connecting" }[state];
}

// worker.state (a worker's per-component steps) is the bulk of a load's events and no view
// shows it: what it changes reaches the views as model.* events.
const EVENTS = "/api/events?exclude=worker.state";
const stream = new EventStream(
  EVENTS,
  (type, data) => current?.onEvent?.(type, data),
  (state) => {
    setLive(state);
    if (state === "live") current?.refresh?.(); // caught up after a gap: whatever was missed
  },
);

function safeDecode(part) {
  try {
    return decodeURIComponent(part);
  } catch {
    return part; // a stray % in a typed address: taken as it is
  }
}

function route() {
  if (locked) return;
  current?.destroy?.();
  current = null;
  const [name, ...rest] = location.hash.replace(/^#\/?/, "").split("/");
  const known = Object.hasOwn(ROUTES, name);
  const module = known ? ROUTES[name] : notFound;
  for (const a of document.querySelectorAll("nav a")) {
    a.classList.toggle("active", known && (a.dataset.route === (name || "devices") || (name === "model" && a.dataset.route === "library")));
  }
  const root = h("div", { class: "page", "data-page": known ? name || "devices" : "not-found" });
  view.replaceChildren(root);
  current = module.mount(root, ctx, rest.map(safeDecode).join("/"), safeDecode(location.hash));
}

function lock(message) {
  if (locked) return;
  locked = true;
  stream.stop();
  current?.destroy?.();
  current = null;
  view.replaceChildren();
  setLive("locked");
  const error = document.getElementById("login-error");
  error.hidden = !message;
  error.textContent = message || "";
  login.hidden = false;
  forget.hidden = true;
  document.getElementById("token").focus();
}

function unlock() {
  locked = false;
  login.hidden = true;
  forget.hidden = !hasToken();
  stream.start();
  route();
}

onUnauthorized(() => {
  const had = hasToken();
  forgetToken();
  lock(had ? "That token was refused." : "");
});

document.getElementById("login-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const input = document.getElementById("token");
  const value = input.value.trim();
  input.value = ""; // never kept in the page
  if (!value) return;
  setToken(value);
  unlock();
});

forget.addEventListener("click", () => {
  forgetToken();
  lock("");
});

window.addEventListener("hashchange", route);
unlock();
