"""The web dashboard: static pages and one ES module set, served by the API's own app at ``/``.

``install(app, settings)`` is the one hook (``modelkeeper.api.app`` calls it after the API's
security middleware): the page shell and its assets are answered before the bearer-token check
(they hold no data; the page asks for the token and sends it on every API call), behind the same
Host allowlist, with a strict Content-Security-Policy. Everything the pages show comes from the
JSON API and its event stream. See docs/DASHBOARD.md.
"""

from modelkeeper.web.pages import Asset, DashboardPages, install

__all__ = ["Asset", "DashboardPages", "install"]
