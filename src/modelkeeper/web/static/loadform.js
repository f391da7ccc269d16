// The load form's options behind a "More load options" disclosure: compute dtype, storage dtype,
// offload and keep-alive, as the REST load body takes them. What is typed is checked here, next to
// the field, so a typo never reaches the service; a field left blank is left out of the body (the
// service's default, and a load of a model already loaded then asks for nothing new).
import { h } from "./dom.js";

const DTYPES = ["float32", "float16", "bfloat16"];
const STORAGE_DTYPES = ["float8_e4m3fn", "float8_e5m2"];

// The sizes a user may type, as modelkeeper/sizes.py reads them: decimal and binary units.
const FACTORS = {
  "": 1, b: 1,
  k: 1e3, kb: 1e3, m: 1e6, mb: 1e6, g: 1e9, gb: 1e9, t: 1e12, tb: 1e12,
  kib: 2 ** 10, mib: 2 ** 20, gib: 2 ** 30, tib: 2 ** 40,
};
const SIZE = /^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([a-zA-Z]*)\s*$/;

/** Bytes of ``4GB`` (4 * 10^9), ``512MiB`` (512 * 2^20), ``1.5 GB``, ``1000000``; an Error saying
 * what is wanted for anything else. */
export function parseSize(text) {
  const match = SIZE.exec(text);
  const factor = match ? FACTORS[match[2].toLowerCase()] : undefined;
  if (factor === undefined) {
    if (text.trim().startsWith("-")) throw new Error(`${text.trim()}: a size cannot be negative`);
    throw new Error(`${text.trim()}: expected none, auto or a size like 4GB, 512MiB`);
  }
  return Math.floor(Number(match[1]) * factor);
}

/** ``offload`` as the body takes it: undefined (blank: left out), "none", "auto", or bytes. */
export function parseOffload(text) {
  const value = text.trim();
  if (!value) return undefined;
  if (["none", "auto"].includes(value.toLowerCase())) return value.toLowerCase();
  return parseSize(value);
}

/** ``keep_alive`` in seconds: undefined (blank: the service's setting), else a number >= -1. */
export function parseKeepAlive(text) {
  const value = text.trim();
  if (!value) return undefined;
  const n = Number(value);
  if (!Number.isFinite(n) || n < -1) throw new Error(`${value}: seconds (0: as soon as unused, -1: never)`);
  return n;
}

/** The disclosure and ``read()``: the options for the body, or null when a field is wrong (its
 * error shown next to it, the disclosure opened on it). */
export function loadOptions() {
  const dtype = h(
    "select",
    { name: "dtype" },
    h("option", { value: "" }, "the file's"),
    DTYPES.map((d) => h("option", { value: d }, d)),
  );
  const storage = h(
    "select",
    { name: "storage_dtype" },
    h("option", { value: "" }, "the compute dtype"),
    STORAGE_DTYPES.map((d) => h("option", { value: d }, d)),
  );
  const offload = h("input", { name: "offload", type: "text", placeholder: "none", size: "10", autocomplete: "off", spellcheck: "false" });
  const keepAlive = h("input", { name: "keep_alive", type: "text", inputmode: "decimal", placeholder: "default", size: "8", autocomplete: "off" });
  const chosen = h("span", { class: "chosen muted" });
  const fields = [
    { input: offload, name: "offload", parse: parseOffload },
    { input: keepAlive, name: "keep-alive", parse: parseKeepAlive },
  ];
  for (const f of fields) {
    f.error = h("span", { class: "field-error", "data-field": f.input.name, role: "alert", hidden: true });
    f.input.addEventListener("input", () => clear(f));
  }
  const node = h(
    "details",
    { class: "load-options" },
    h("summary", null, "More load options", chosen),
    h(
      "div",
      { class: "row" },
      h("label", null, "Compute dtype ", dtype),
      h("label", null, "Stored as ", storage),
      h("label", null, "Offload (none, auto or a size) ", offload, fields[0].error),
      h("label", null, "Keep-alive (s) ", keepAlive, fields[1].error),
    ),
  );

  function clear(f) {
    f.error.hidden = true;
    f.error.textContent = "";
    f.input.removeAttribute("aria-invalid");
  }

  function read() {
    const body = {};
    if (dtype.value) body.dtype = dtype.value;
    if (storage.value) body.storage_dtype = storage.value;
    let ok = true;
    const values = {};
    for (const f of fields) {
      clear(f);
      try {
        values[f.input.name] = f.parse(f.input.value);
      } catch (err) {
        ok = false;
        f.error.textContent = `${f.name}: ${err.message}`;
        f.error.hidden = false;
        f.input.setAttribute("aria-invalid", "true");
      }
    }
    if (!ok) {
      node.open = true;
      return null;
    }
    if (values.offload !== undefined) body.offload = values.offload;
    if (values.keep_alive !== undefined) body.keep_alive = values.keep_alive;
    return body;
  }

  // what is set shows on the closed disclosure too, so a load never asks for more than it seems
  const show = () => {
    const set = [
      dtype.value && dtype.value,
      storage.value && `stored as ${storage.value}`,
      offload.value.trim() && `offload ${offload.value.trim()}`,
      keepAlive.value.trim() && `keep-alive ${keepAlive.value.trim()} s`,
    ].filter(Boolean);
    chosen.textContent = set.length ? `: ${set.join(", ")}` : "";
  };
  for (const input of [dtype, storage, offload, keepAlive]) input.addEventListener("input", show);

  return { node, read };
}
