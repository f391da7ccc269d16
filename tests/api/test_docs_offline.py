"""``/docs`` works offline: the page references only the service's own URLs (Swagger UI's script
and style sheet are served from the package), and each of them answers."""

from __future__ import annotations

import re
from pathlib import Path

from fastapi.testclient import TestClient

from modelkeeper.api.app import create_app
from modelkeeper.orchestrator import Settings


def test_docs_reference_only_local_urls_that_answer(tmp_path: Path) -> None:
    settings = Settings(devices=["cpu"], model_roots=[tmp_path], db=tmp_path / "registry.sqlite3")
    client = TestClient(
        create_app(settings), base_url="http://127.0.0.1"
    )  # no lifespan: no workers, the page needs none
    page = client.get("/docs")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    urls = re.findall(r"""(?:src|href)=["']([^"']+)["']""", page.text)
    urls += re.findall(r"""url: ?["']([^"']+)["']""", page.text)
    assert len(urls) >= 4, page.text  # script, style sheet, icon, the spec
    assert not [u for u in urls if not u.startswith("/") or u.startswith("//")], urls
    assert "cdn" not in page.text.lower()
    for url in urls:
        answer = client.get(url)
        assert answer.status_code == 200, url
    script = client.get("/docs/assets/swagger-ui-bundle.js")
    assert (
        script.headers["content-type"].startswith("text/javascript") and b"SwaggerUIBundle" in script.content
    )
    assert client.get("/docs/assets/../app.py").status_code == 404
    assert client.get("/docs/assets/nope.js").json()["error_code"] == "NOT_FOUND"
    assert client.get("/redoc").status_code == 404  # it would load from a CDN
