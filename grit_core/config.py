"""Typed configuration: YAML files loaded into dataclasses, with ``--set a.b=c`` overrides.

One mechanism serves both apps: :func:`load_config` fills any dataclass tree (``grit_pipeline.config.GritConfig``,
``kosmos.cli.train.config.TrainConfig``) from a YAML file and dotted overrides, rejects unknown keys with a message
that names the key and the keys that exist, and checks value types (``Literal`` fields against their choices).
:func:`dump_config` writes the resolved config back as YAML, which every output keeps beside itself.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override that does not fit the dataclass it is loaded into."""


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> T:
    """Build ``cls`` from its defaults, then the YAML file at ``path``, then ``key=value`` overrides, in that order.

    Override values are parsed as YAML scalars or flow collections (``3``, ``0.5``, ``true``, ``[a, b]``).
    Raises :class:`ConfigError` naming the offending key for unknown keys, bad types and malformed overrides.
    """
    data: dict[str, Any] = {}
    source = "config"
    if path is not None:
        source = str(path)
        text = Path(path).read_text(encoding="utf-8")
        loaded = yaml.safe_load(text)
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping, got {type(loaded).__name__}")
        data = loaded
    aliases: dict[str, str] = getattr(cls, "ALIASES", {})
    for old, new in aliases.items():
        _move_subtree(data, old, new, source)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        _set_dotted(data, _aliased(key.strip(), aliases), _parse_scalar(raw))
    return _build(cls, data, prefix="", source=source)


def _aliased(key: str, aliases: dict[str, str]) -> str:
    for old, new in aliases.items():
        if key == old or key.startswith(old + "."):
            return new + key[len(old) :]
    return key


def _move_subtree(data: dict[str, Any], old: str, new: str, source: str) -> None:
    """Move the value at dotted ``old`` to ``new``; keys already set at ``new`` win over the old spelling."""
    *parents, leaf = old.split(".")
    node: Any = data
    for part in parents:
        node = node.get(part) if isinstance(node, dict) else None
    if not isinstance(node, dict) or leaf not in node:
        return
    value = node.pop(leaf)
    if value is None:
        return
    current = data
    for part in new.split(".")[:-1]:
        current = current.setdefault(part, {})
        if not isinstance(current, dict):
            raise ConfigError(f"{source}: '{old}' moves to '{new}', but '{part}' there is a value, not a section")
    last = new.split(".")[-1]
    there = current.get(last)
    if isinstance(value, dict) and isinstance(there, dict):
        value = {**value, **there}
    elif there is not None:
        value = there
    current[last] = value


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain dicts and lists (for YAML/JSON)."""
    return dataclasses.asdict(cfg)


def dump_config(cfg: Any, path: str | Path | None = None) -> str:
    """Serialise ``cfg`` as YAML; also write it to ``path`` when given."""
    text = yaml.safe_dump(config_to_dict(cfg), sort_keys=False, allow_unicode=True)
    if path is not None:
        Path(path).write_text(text, encoding="utf-8")
    return text


def _parse_scalar(raw: str) -> Any:
    raw = raw.strip()
    if raw == "":
        return ""
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw
    if isinstance(value, str):
        # YAML 1.1 reads "4e-3" (no dot in the mantissa) as a string; users mean a number.
        try:
            return float(value) if _FLOAT_RE.fullmatch(value) else value
        except ValueError:
            return value
    return value


_FLOAT_RE = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override {key!r}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = value


def _build(cls: type[T], data: dict[str, Any], prefix: str, source: str) -> T:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: '{prefix.rstrip('.') or '<top>'}' must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(known))
    if unknown:
        where = prefix.rstrip(".") or "the top level"
        raise ConfigError(
            f"{source}: unknown key '{prefix}{unknown[0]}' (known keys in {where}: {', '.join(sorted(known))})"
        )
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(hints[name], value, f"{prefix}{name}", source)
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, key: str, source: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value if value is not None else {}, prefix=f"{key}.", source=source)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, key, source)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{source}: bad value for '{key}': {value!r}")
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: '{key}' must be a list, got {value!r}")
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        return [_coerce(item_tp, v, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: '{key}' must be a mapping, got {value!r}")
        _, value_tp = typing.get_args(tp) or (str, Any)
        return {k: _coerce(value_tp, v, f"{key}.{k}", source) for k, v in value.items()}
    if origin is typing.Literal:
        choices = typing.get_args(tp)
        if value in choices and not (isinstance(value, bool) and True not in choices and False not in choices):
            return value
        names = ", ".join(str(c) for c in choices)
        raise ConfigError(f"{source}: '{key}' must be one of {names}, got {value!r}")
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{source}: '{key}' must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{source}: '{key}' must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{source}: '{key}' must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        if value is None:
            return ""
        raise ConfigError(f"{source}: '{key}' must be a string, got {value!r}")
    return value
