"""Names and paths from the command line that reach a filter, a path or a job script, checked up
front (one-line ConfigError, exit code 2), and MLflow filters no value can change the meaning of.

    check_name("sweep.name", "it's")      # ConfigError: sweep.name="it's": ... not ' " / \\ ...
    check_dir("sweep.dir", "/etc/passwd")  # ConfigError: ... is a file, not a directory
    filter_string({"tags.sweep": "s1", "attributes.status": "RUNNING"})

A sweep's name is its directory (`<sweep.dir>/<name>`), its MLflow experiment, part of its Optuna
study names and a value inside MLflow filter strings; a cell's name is a tag value in filters.
MLflow's filter grammar has no escape for a quote inside a quoted value, so a quote in a name
would end the value early (a traceback, or a different query); rejecting it up front is the
only way that keeps the name equal everywhere. Torch-free.
"""

from __future__ import annotations

import os
import unicodedata
from collections.abc import Mapping
from pathlib import Path

from bln_sweeps.config import ConfigError

# Characters a name that becomes a path or a filter value may not hold
_NOT_IN_NAMES = "'\"/\\"
_RULE = "a non-empty name without quotes, '/', '\\', control characters or edge spaces"


def _control(text: str) -> str | None:
    return next((c for c in text if unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp")), None)


def check_name(key: str, value: object, path: bool = True) -> str:
    """`value` as a name that is safe in an MLflow filter and (when `path`) as one path part."""
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(key, value, f"must be {_RULE}")
    bad = _control(value) or next((c for c in value if c in _NOT_IN_NAMES), None)
    if bad is not None and (path or bad in "'\"\\"):
        raise ConfigError(key, value, f"contains {bad!r}; must be {_RULE}")
    if value != value.strip():
        raise ConfigError(key, value, f"starts or ends with a space; must be {_RULE}")
    if path and value in (".", ".."):
        raise ConfigError(key, value, f"is not a directory name; must be {_RULE}")
    return value


def check_dir(key: str, value: object) -> Path:
    """`value` as a directory this process can create or write into: an existing file on the way,
    or a read-only ancestor, is one line now instead of a traceback after runs were created."""
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(key, value, "must be a directory path")
    bad = _control(value)
    if bad is not None:
        raise ConfigError(key, value, f"contains {bad!r}; must be a directory path")
    path = Path(value).expanduser().absolute()
    for part in (path, *path.parents):
        try:
            exists = part.exists()
        except OSError as e:  # e.g. a name longer than the filesystem allows
            raise ConfigError(key, value, f"cannot be a directory: {e.strerror}") from None
        if exists:
            if not part.is_dir():
                raise ConfigError(key, value, f"{part} is a file, not a directory")
            if not os.access(part, os.W_OK | os.X_OK):
                raise ConfigError(key, value, f"{part} is not writable by this user")
            return path
    return path


def quotable(value: str) -> bool:
    """Whether `value` can be an MLflow filter string literal (nothing in it ends the literal)."""
    return not (any(c in value for c in "'\\") or _control(value))


def filter_value(value: str) -> str:
    """`value` quoted as an MLflow filter string literal; raises ValueError for a value that
    would end the literal (names are checked before they get here)."""
    if not quotable(value):
        raise ValueError(f"{value!r} cannot be quoted in an MLflow filter")
    return f"'{value}'"


def filter_string(conditions: Mapping[str, str]) -> str:
    """`{"tags.kind": "cell", ...}` -> "tags.kind = 'cell' and ...": keys are ours, values
    quoted by filter_value."""
    return " and ".join(f"{key} = {filter_value(str(v))}" for key, v in conditions.items())
