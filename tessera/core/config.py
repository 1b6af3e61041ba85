"""Typed configuration: one dataclass per stage, TOML presets, `key.sub=value` overrides.

Precedence is CLI > TOML > dataclass defaults. Every field carries its documentation in
`field(metadata={"doc": ...})` (use `param(default, "doc")`), which `tessera config --keys`
prints. Unknown keys and values of the wrong type are rejected with the key's dotted name and
the expected type.

The stage dataclasses live beside their stages (`dataprep/config.py`, `trainer/config.py`);
`tessera.core.root_config` composes them into the root `TesseraConfig`; this module implements loading.
"""

from __future__ import annotations

import dataclasses
import io
import sys
import types
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

import tomli_w

from tessera.core.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[2]
PRESET_DIR = REPO_ROOT / "configs"


def param(default: Any = dataclasses.MISSING, doc: str = "", *, factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field with its documentation. `factory` for mutable defaults (lists, nested configs)."""
    if factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=factory, metadata={"doc": doc})
    return dataclasses.field(default=default, metadata={"doc": doc})


# --------------------------------------------------------------------------------------------
# Type checking and coercion


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if origin in (list, tuple):
        args = get_args(tp)
        inner = _type_name(args[0]) if args else "any"
        return f"list of {inner}"
    if tp is type(None):
        return "none"
    if dataclasses.is_dataclass(tp):
        return f"table [{tp.__name__}]"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Return `value` as type `tp`, or raise ConfigError naming `key` and the expected type."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        if value in get_args(tp):
            return value
        raise ConfigError(f"config key '{key}': expected {_type_name(tp)}, got {value!r}")
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError:
                pass
        raise ConfigError(f"config key '{key}': expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}': expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
        args = get_args(tp)
        inner = args[0] if args else Any
        items = [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}': expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
        return from_dict(tp, value, prefix=key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}': expected bool, got {type(value).__name__} {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}': expected int, got {type(value).__name__} {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"config key '{key}': expected float, got {type(value).__name__} {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"config key '{key}': expected str, got {type(value).__name__} {value!r}")
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(f"config key '{key}': expected {_type_name(tp)}, got {type(value).__name__} {value!r}")


def _hints(cls: type) -> dict[str, Any]:
    return get_type_hints(cls, include_extras=False)


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass `cls` from a nested dict, rejecting unknown keys and wrong types."""
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else k
        if k not in names:
            near = [n for n in sorted(names) if n.startswith(k[:3])]
            hint = f" (did you mean {', '.join(near)}?)" if near else ""
            raise ConfigError(f"unknown config key '{key}'{hint}; known keys under '{prefix or '<root>'}': {', '.join(sorted(names))}")
        kwargs[k] = _coerce(v, hints[k], key)
    try:
        obj = cls(**kwargs)
    except TypeError as e:  # a required field without a value
        raise ConfigError(f"config section '{prefix or '<root>'}': {e}") from None
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate()
    return obj


def to_dict(obj: Any) -> dict[str, Any]:
    """A dataclass tree as a plain dict (lists for tuples), ready for TOML or JSON."""
    return dataclasses.asdict(obj)


def _drop_none(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _drop_none(v) for k, v in d.items() if v is not None}
    if isinstance(d, (list, tuple)):
        return [_drop_none(v) for v in d]
    return d


def dumps_toml(obj: Any) -> str:
    """TOML text for a dataclass tree. Keys whose value is None are left out (None means 'the default')."""

    return tomli_w.dumps(_drop_none(to_dict(obj) if dataclasses.is_dataclass(obj) else obj))


def write_toml(obj: Any, path: str | Path) -> None:
    """Write `obj` as TOML atomically (temporary name, then rename)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(dumps_toml(obj))
    tmp.replace(path)


# --------------------------------------------------------------------------------------------
# Overrides


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (['a','b','c'], value). The value is read as a TOML literal, else as a string."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form key.sub=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{text}' has an empty key")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.split("."), value


def _set_path(data: dict[str, Any], path: list[str], value: Any) -> None:
    cur = data
    for part in path[:-1]:
        nxt = cur.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"config key '{'.'.join(path)}': '{part}' is a value, not a table")
        cur = nxt
    cur[path[-1]] = value


def resolve_preset(name_or_path: str | Path) -> Path:
    """A preset name ('demo') or a path to a TOML file."""
    p = Path(name_or_path)
    if p.suffix == ".toml" or p.exists():
        if not p.is_file():
            raise ConfigError(f"config file '{p}' does not exist")
        return p
    cand = PRESET_DIR / f"{name_or_path}.toml"
    if cand.is_file():
        return cand
    known = sorted(x.stem for x in PRESET_DIR.glob("*.toml"))
    raise ConfigError(f"config '{name_or_path}' is neither a file nor a preset; presets: {', '.join(known)}")


def load_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file '{path}' does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file '{path}' is not valid TOML: {e}") from None


def load(cls: type, preset: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (), base: dict | None = None) -> Any:
    """Defaults < TOML preset (or `base` dict) < overrides, validated into `cls`."""
    data: dict[str, Any] = {}
    if base is not None:
        data = _deep_copy(base)
    if preset is not None:
        data = _merge(data, load_preset(preset))
    for ov in overrides:
        path, value = parse_override(ov)
        _set_path(data, path, value)
    return from_dict(cls, data)


def load_preset(name_or_path: str | Path, _seen: tuple[str, ...] = ()) -> dict[str, Any]:
    """A preset's TOML as a dict; a top-level `extends = "other"` loads that preset first (then this one on top)."""
    path = resolve_preset(name_or_path)
    key = str(path.resolve())
    if key in _seen:
        raise ConfigError(f"config file '{path}': 'extends' forms a cycle")
    data = load_toml(path)
    parent = data.pop("extends", None)
    if parent is None:
        return data
    if not isinstance(parent, str):
        raise ConfigError(f"config file '{path}': 'extends' expected str, got {type(parent).__name__}")
    return _merge(load_preset(parent, _seen + (key,)), data)


def _deep_copy(d: dict) -> dict:
    return {k: _deep_copy(v) if isinstance(v, dict) else v for k, v in d.items()}


def _merge(a: dict, b: dict) -> dict:
    out = _deep_copy(a)
    for k, v in b.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def describe(cls: type, prefix: str = "") -> list[tuple[str, str, Any, str]]:
    """(dotted key, type, default, doc) for every leaf of a dataclass tree: the `--keys` table."""
    rows = []
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}.{f.name}" if prefix else f.name
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            rows.extend(describe(tp, key))
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        else:
            default = "<required>"
        rows.append((key, _type_name(tp), default, f.metadata.get("doc", "")))
    return rows


def format_keys(cls: type) -> str:
    buf = io.StringIO()
    for key, tp, default, doc in describe(cls):
        buf.write(f"{key} ({tp}, default {default!r})\n    {doc}\n")
    return buf.getvalue()


__all__ = [
    "param",
    "from_dict",
    "to_dict",
    "dumps_toml",
    "write_toml",
    "parse_override",
    "load",
    "load_toml",
    "resolve_preset",
    "describe",
    "format_keys",
]
