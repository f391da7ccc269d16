// An address that names no page (#/bogus): say so and link to the pages, never silently show
// another one. The address is shown as text, like everything else.
import { h } from "./dom.js";

export const PAGES = [
  ["#/", "Devices"],
  ["#/cache", "RAM cache"],
  ["#/jobs", "Jobs"],
  ["#/library", "Library"],
];

export function mount(root, ctx, rest, hash) {
  root.append(
    h(
      "section",
      { class: "card not-found" },
      h("h1", null, "No such page"),
      h("p", null, "Nothing lives at ", h("code", null, hash), ". The pages are:"),
      h("ul", null, PAGES.map(([href, name]) => h("li", null, h("a", { href }, name)))),
      h("p", { class: "muted" }, "A model's page opens from the library: #/model/<id>."),
    ),
  );
  return {};
}
