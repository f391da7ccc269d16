"""What to install: the source text parsed into a Hub repo, a plain URL or a CivitAI version.

Accepted forms::

    org/name                         a Hub repo at its default branch
    org/name@revision                at a branch, tag or commit
    org/name:path/in/repo            one file, or one subfolder, of the repo
    org/name@revision:path           both
    https://huggingface.co/org/name[/tree|blob|resolve/<rev>/<path>]   the same, as a Hub page URL
    civitai:123                      a CivitAI model-version id
    https://civitai.com/models/12[/slug][?modelVersionId=34]           a CivitAI model page
    https://civitai.com/api/download/models/34                         a CivitAI download link
    https://host/any/file.safetensors                                  a plain URL (http or https)

Hub and CivitAI URLs are recognised by host: the public hosts plus the endpoints an installer is
configured with (``HF_ENDPOINT``, a CivitAI endpoint), so a private mirror works the same.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Collection
from dataclasses import dataclass
from urllib.parse import parse_qs, unquote, urlsplit

from modelkeeper.install.errors import InvalidSource, UnsafeSource, redact_url

__all__ = [
    "ALLOWED_SCHEMES",
    "CivitaiSource",
    "HubSource",
    "Source",
    "UrlSource",
    "check_scheme",
    "parse_source",
    "safe_relative",
]

ALLOWED_SCHEMES = frozenset({"http", "https"})
HUB_HOSTS = frozenset({"huggingface.co", "www.huggingface.co", "hf.co"})
CIVITAI_HOSTS = frozenset({"civitai.com", "www.civitai.com"})

# huggingface_hub's own rule: 1-96 of [A-Za-z0-9._-] per part, no "--" or "..".
_REPO_PART = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?"
_REPO_RE = re.compile(rf"^(?P<repo>{_REPO_PART}/{_REPO_PART})(?:@(?P<rev>[^:\s]+))?(?::(?P<path>.+))?$")
_CIVITAI_ID_RE = re.compile(r"^civitai:(?P<id>\d+)$", re.IGNORECASE)


@dataclass(frozen=True)
class HubSource:
    """A Hugging Face Hub model repo; ``path`` is a file or a subfolder (``None``: the whole repo)."""

    repo_id: str
    revision: str | None = None
    path: str | None = None

    def canonical(self) -> str:
        text = self.repo_id + (f"@{self.revision}" if self.revision else "")
        return text + (f":{self.path}" if self.path else "")


@dataclass(frozen=True)
class UrlSource:
    """A plain http(s) URL of one file."""

    url: str

    def canonical(self) -> str:
        return redact_url(self.url)


@dataclass(frozen=True)
class CivitaiSource:
    """A CivitAI model version (or a model, whose latest version is then taken)."""

    version_id: int | None = None
    model_id: int | None = None

    def canonical(self) -> str:
        if self.version_id is not None:
            return f"civitai:{self.version_id}"
        return f"civitai:model/{self.model_id}"


Source = HubSource | UrlSource | CivitaiSource


def safe_relative(name: str, *, what: str) -> str:
    """``name`` as a clean relative POSIX path, or :class:`UnsafeSource` if it could leave its folder.

    Refused: empty names, absolute paths (``/x``, ``C:\\x``), backslashes, NUL bytes and any
    ``..`` or ``.`` component. ``what`` names the listing it came from, for the message.
    """
    if not name or "\x00" in name or "\\" in name:
        raise UnsafeSource(f"{what}: unsafe file name {name!r}", file=name)
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        raise UnsafeSource(f"{what}: absolute file name {name!r} refused", file=name)
    parts = name.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise UnsafeSource(f"{what}: file name {name!r} has an empty, '.' or '..' component", file=name)
    return posixpath.join(*parts)


def check_scheme(url: str, *, what: str) -> None:
    """:class:`UnsafeSource` unless ``url`` is http or https with a host."""
    parts = urlsplit(url)
    if parts.scheme.lower() not in ALLOWED_SCHEMES:
        raise UnsafeSource(
            f"{what}: scheme {parts.scheme or '(none)'!r} refused (only http and https): {redact_url(url)}",
            url=redact_url(url),
        )
    if not parts.hostname:
        raise InvalidSource(f"{what}: URL without a host: {redact_url(url)}", url=redact_url(url))


def parse_source(
    text: str, *, hub_hosts: Collection[str] = (), civitai_hosts: Collection[str] = ()
) -> Source:
    """The source named by ``text`` (see the module docstring), or :class:`InvalidSource`.

    ``hub_hosts`` and ``civitai_hosts`` add hosts (``host`` or ``host:port``) recognised as the Hub
    or CivitAI besides the public ones.
    """
    text = text.strip()
    if not text:
        raise InvalidSource("empty source")
    if m := _CIVITAI_ID_RE.match(text):
        return CivitaiSource(version_id=int(m["id"]))
    if "://" in text:
        check_scheme(text, what="source")
        parts = urlsplit(text)
        host = (parts.hostname or "").lower()
        netloc = f"{host}:{parts.port}" if parts.port else host
        if host in CIVITAI_HOSTS or netloc in civitai_hosts:
            return _civitai_url(text)
        if host in HUB_HOSTS or netloc in hub_hosts:
            return _hub_url(text)
        return UrlSource(text)
    if m := _REPO_RE.match(text):
        if "--" in m["repo"] or ".." in m["repo"]:
            raise InvalidSource(f"{text!r}: a repo id cannot contain '--' or '..'")
        path = safe_relative(m["path"].strip("/"), what=text) if m["path"] else None
        return HubSource(m["repo"], m["rev"], path)
    raise InvalidSource(
        f"{text!r} is not a source: expected org/name[@revision][:path], an http(s) URL or civitai:<version id>"
    )


def _hub_url(url: str) -> HubSource:
    segments = [unquote(s) for s in urlsplit(url).path.split("/") if s]
    if len(segments) < 2:
        raise InvalidSource(f"{redact_url(url)}: a Hub URL names a repo (org/name)")
    repo = "/".join(segments[:2])
    rest = segments[2:]
    revision = path = None
    if rest:
        if rest[0] not in ("tree", "blob", "resolve") or len(rest) < 2:
            raise InvalidSource(f"{redact_url(url)}: expected /tree, /blob or /resolve with a revision")
        revision = rest[1]
        path = "/".join(rest[2:]) or None
    source = parse_source(repo + (f"@{revision}" if revision else "") + (f":{path}" if path else ""))
    assert isinstance(source, HubSource)
    return source


def _civitai_url(url: str) -> CivitaiSource:
    parts = urlsplit(url)
    segments = [s for s in parts.path.split("/") if s]
    query = parse_qs(parts.query)
    version = query.get("modelVersionId", [None])[0]
    if segments[:3] == ["api", "download", "models"] and len(segments) == 4 and segments[3].isdigit():
        return CivitaiSource(version_id=int(segments[3]))
    if len(segments) >= 2 and segments[0] == "models" and segments[1].isdigit():
        if version is not None and version.isdigit():
            return CivitaiSource(version_id=int(version), model_id=int(segments[1]))
        return CivitaiSource(model_id=int(segments[1]))
    raise InvalidSource(f"{redact_url(url)}: not a CivitAI model page (/models/<id>) or download link")
