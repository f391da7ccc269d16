"""The shipped scripts never turn text into markup or code: every element is made by ``h()`` in
``dom.js`` (createElement, createTextNode), so what model files say stays text. The browser tests
show it for the pages they open; this holds for every line, the paths no test takes included."""

from __future__ import annotations

import re
from importlib import resources

#: What would parse a string as HTML or run it as code.
SINKS = re.compile(
    r"\.(innerHTML|outerHTML|insertAdjacentHTML)\b|document\.write|DOMParser|createContextualFragment"
    r"|\beval\(|new Function\(|setTimeout\(\s*[\"'`]|setInterval\(\s*[\"'`]"
)


def test_no_script_builds_markup_or_code_from_strings() -> None:
    static = resources.files("modelkeeper.web") / "static"
    scripts = sorted((f.name, f.read_text()) for f in static.iterdir() if f.name.endswith(".js"))
    assert len(scripts) >= 10
    found = [f"{name}: {m.group(0)}" for name, text in scripts for m in SINKS.finditer(text)]
    assert found == []
