"""What may be written of a URL: its password masked at every boundary; the real URL kept private.

    mask_url("postgresql://bob:s/cr%40t@db:5432/optuna")   # -> "postgresql://bob:***@db:5432/optuna"
    mask_text("storage.url='postgresql://bob:pw@db/x': cannot connect")  # the same, inside text
    mask_tree({"tracking": {"uri": "..."}})                # every string of a config tree

The password is what SQLAlchemy's URL parser (`make_url`) calls the password: SQLAlchemy is what
opens every database URL of a sweep (Optuna's RDB storage, MLflow's SQL stores), so the text it
would send as a password is exactly the text masked, '/', ':' and '%XX' escapes included (a
regex over `user:password@` missed a password holding '/'). URLs SQLAlchemy cannot parse fall
back to `urllib.parse`. Only the password is hidden; scheme, user, host and database stay
readable, so an error line still says where it tried to connect.

A sweep's real URLs never go into its manifest: `split_private` takes them out, the manifest
keeps masked copies, and `PRIVATE_FILE` (mode 0600, in the sweep directory) holds the real ones
for the processes that connect (workers, `status`, `ui`, `bln-analyze`), which read them back
with `with_private`. Torch-free and light: login-node tools import it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

MASK = "***"
PRIVATE_FILE = "credentials.json"  # <sweep dir>/credentials.json, mode 0600
# Manifest fields that hold URLs, and the list of command-line overrides (may hold URLs too).
PRIVATE_KEYS = ("storage_url", "tracking_uri", "base_overrides")

_SCHEME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789+.-")
_URL_ENDS = frozenset(" \t\r\n'\"`")  # where a URL inside text ends (it is quoted or spaced)


def _password_span(url: str) -> tuple[int, int] | None:
    """(start, end) of the password's raw text in `url`, or None when it has none."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return None
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):
        parsed = None
    if parsed is not None:
        if parsed.password is None:
            return None
        # make_url reads `user` up to the first ':' (a user holds no ':' or '/'), then the
        # password up to the next '@'.
        start = len(scheme) + 3 + rest.index(":") + 1
        end = url.index("@", start)
        host = parsed.host or ""
        if "@" in host:  # an unescaped '@' in the password: it runs to the host's last '@'
            end += len(host.rsplit("@", 1)[0]) + 1
        return start, end
    # A scheme SQLAlchemy does not know (e.g. `mlflow-artifacts`): urllib's netloc stops at the
    # first '/', which may sit inside the password, so the user info runs to the last '@' when
    # urllib saw a `user:` before it (masking too much is safe, too little is not).
    from urllib.parse import urlsplit

    try:
        user = urlsplit(url).username
    except ValueError:
        user = None
    userinfo = rest[: rest.rindex("@")]
    if user is None and ":" not in userinfo.split("/", 1)[0]:
        return None
    if ":" not in userinfo:
        return None
    start = len(scheme) + 3 + userinfo.index(":") + 1
    return start, len(scheme) + 3 + len(userinfo)


def mask_url(url: str) -> str:
    """`scheme://user:password@host/...` -> `scheme://user:***@host/...`; other text unchanged."""
    span = _password_span(url)
    return url if span is None else url[: span[0]] + MASK + url[span[1] :]


def mask_text(text: str) -> str:
    """Every URL inside `text` (an error line, a command, a log message) with its password masked.

    A URL starts at its scheme and ends at a space or a quote: how URLs appear in commands and
    in the repr() of error messages.
    """
    if not isinstance(text, str) or "://" not in text:
        return text
    out, pos = [], 0
    while True:
        mark = text.find("://", pos)
        if mark < 0:
            break
        start = mark
        while start > pos and text[start - 1] in _SCHEME_CHARS:
            start -= 1
        end = mark + 3
        while end < len(text) and text[end] not in _URL_ENDS:
            end += 1
        out.append(text[pos:start])
        out.append(mask_url(text[start:end]) if start < mark else text[start:end])
        pos = end
    out.append(text[pos:])
    return "".join(out)


def mask_tree(value: Any) -> Any:
    """A config tree (dicts, lists, scalars) with every string masked: what may be written of it."""
    if isinstance(value, str):
        return mask_text(value)
    if isinstance(value, Mapping):
        return {k: mask_tree(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [mask_tree(v) for v in value]
    return value


def split_private(manifest: dict) -> tuple[dict, dict]:
    """(the manifest as it may be written, the real values of its URL fields when masking changed
    them; {} when there is nothing to hide)."""
    public = {**manifest, "command": mask_text(manifest.get("command", ""))}
    private = {}
    for key in PRIVATE_KEYS:
        if key in manifest and mask_tree(manifest[key]) != manifest[key]:
            public[key] = mask_tree(manifest[key])
            private[key] = manifest[key]
    return public, private


def write_private(path: Path, data: dict) -> None:
    """Write `data` as JSON readable by its owner only (created 0600, never world-readable)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)


def with_private(manifest: dict, sweep_dir: Path) -> dict:
    """The manifest with its real URLs put back from `<sweep dir>/credentials.json`, if any."""
    path = Path(sweep_dir) / PRIVATE_FILE
    if not path.exists():
        return manifest
    return {**manifest, **json.loads(path.read_text())}
