"""Shared configuration plumbing: TOML loading and one-line messages for invalid values."""

from __future__ import annotations

import sys
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from confide.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib


def fix(text: str) -> Any:
    """``json_schema_extra`` for a field: the advice :func:`first_error` prints with it."""
    return {"fix": text}


def no_nul(value: Any) -> Any:
    """A reusable ``field_validator("*")``: no text or path setting may hold a NUL byte.

    No file can be named with one; refused here it is one :class:`ConfigError` naming the
    key, instead of a ``ValueError`` traceback the first time the path is opened.
    """
    if isinstance(value, str | Path) and "\x00" in str(value):
        raise ValueError("holds a NUL byte (\\x00), which no file name or setting may")
    return value


def load_toml(path: Path) -> dict[str, Any]:
    """Read a TOML file; a missing or malformed file is a :class:`ConfigError`."""
    if not path.is_file():
        raise ConfigError("--config", f"no such file: {path}", "give the path of a TOML file")
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError("--config", f"{path} is not valid TOML ({e})", "fix the syntax") from e


def first_error(
    err: ValidationError, model: type[BaseModel], *, flag_fields: Collection[str] = ()
) -> ConfigError:
    """Turn pydantic's report into one :class:`ConfigError` naming the field and its fix.

    ``flag_fields`` are the fields given on the command line. The fix comes from the
    field's ``json_schema_extra={"fix": ...}``, so each config class owns its advice.
    """
    e = err.errors()[0]
    loc = [str(p) for p in e["loc"]]
    name = loc[0] if loc else "config"
    fix = _field_fix(model, loc) or "see the documentation of this setting"
    # Name the field the way the user wrote it: a command-line flag or a TOML key.
    label = "--" + name.replace("_", "-") if name in flag_fields else ".".join(loc) or name
    msg = str(e["msg"])
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    if e["type"] == "extra_forbidden":
        owner = _model_at(model, loc[:-1])
        valid = ", ".join(f for f in owner.model_fields if f != "base_dir") if owner else "?"
        return ConfigError(label, "unknown setting", f"remove it; valid here: {valid}")
    problem = f"{msg} (got {e['input']!r})" if "input" in e and e["type"] != "missing" else msg
    return ConfigError(label, problem, fix)


def _field_fix(model: type[BaseModel], loc: list[str]) -> str | None:
    """The ``fix`` advice of the innermost field along ``loc`` that has one."""
    current: type[BaseModel] | None = model
    fix: str | None = None
    for part in loc:
        field = current.model_fields.get(part) if current is not None else None
        if field is None:
            break
        extra = field.json_schema_extra
        if isinstance(extra, Mapping) and "fix" in extra:
            fix = str(extra["fix"])
        ann = field.annotation
        current = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
    return fix


def _model_at(model: type[BaseModel], loc: list[str]) -> type[BaseModel] | None:
    current: type[BaseModel] | None = model
    for part in loc:
        field = current.model_fields.get(part) if current is not None else None
        ann = field.annotation if field is not None else None
        current = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
    return current
