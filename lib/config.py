"""Typed configuration: dataclass defaults < recipe YAML < command-line `key=value` flags.

Each job defines one top-level dataclass whose fields are plain values or nested
dataclasses (one per concern, e.g. `lora`, `train`). A recipe YAML mirrors that nesting;
a flag names a dotted path (`lora.r=16`, `train.batch_size=4`). Any key the dataclass
does not define is an error that names the key and where it came from, so a typo never
silently falls back to a default. Values are checked against the field's type
(`Literal` choices included); `__post_init__` checks run after all layers are merged.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

import yaml

from lib.errors import UserError

T = TypeVar("T")


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check (and gently convert) one value against a type annotation."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise UserError(f"{where}: {value!r} is not one of {', '.join(map(str, choices))}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except UserError as e:
                errors.append(str(e))
        if isinstance(value, str) and value.lower() in ("none", "null") and type(None) in args:
            return None  # `key=none` unsets an optional field unless "none" is itself a choice
        raise UserError(errors[0] if len(errors) == 1 else f"{where}: {value!r} does not fit {tp}")
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{where}: expected a list, got {value!r}")
        (inner, *_) = get_args(tp) or (Any,)
        return [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise UserError(f"{where}: expected a mapping, got {value!r}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise UserError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise UserError(f"{where}: expected a whole number, got {value!r}")
        try:
            return int(value)
        except ValueError:
            raise UserError(f"{where}: expected a whole number, got {value!r}") from None
    if tp is float:
        if isinstance(value, bool):
            raise UserError(f"{where}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise UserError(f"{where}: expected a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise UserError(f"{where}: expected text, got {value!r}")
        return str(value)
    if tp is Path:
        return Path(str(value))
    return value


def _did_you_mean(cls: type, key: str, prefix: str) -> str:
    """'; did you mean lora.r?' for a misspelt key: a key of this section close to it, or a key of
    the same name one section down (`max_steps=` for train.max_steps=); '' when nothing is close."""
    types_ = _field_types(cls)
    below = [f"{prefix}{name}.{sub}" for name, tp in types_.items() if dataclasses.is_dataclass(tp)
             for sub in _field_types(tp) if sub == key]
    close = below or [f"{prefix}{m}" for m in difflib.get_close_matches(key, list(types_), n=1)]
    return f"; did you mean {close[0]}?" if close else ""


def _merge(cls: type, current: dict[str, Any], data: dict[str, Any], where: str, prefix: str = "") -> None:
    """Merge `data` (a YAML mapping) into `current` (field values of `cls`), checking keys.
    `where` names the layer (`recipe FILE`, `flag 'k=v'`), `prefix` the section (`lora.`)."""
    types_ = _field_types(cls)
    for key, value in data.items():
        if key not in types_:
            known = ", ".join(sorted(types_))
            section = f" in {prefix.rstrip('.')}" if prefix else ""
            raise UserError(f"{where}: unknown key '{key}'{section} (known keys{section or ' here'}: {known})"
                            f"{_did_you_mean(cls, key, prefix)}")
        tp = types_[key]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise UserError(f"{where}: '{prefix}{key}' is a section; give it keys, e.g. {prefix}{key}.<name>=...")
            _merge(tp, current.setdefault(key, {}), value, where, f"{prefix}{key}.")
        else:
            current[key] = _coerce(value, tp, f"{where}: {prefix}{key}")


def _build(cls: type[T], values: dict[str, Any]) -> T:
    kwargs = {}
    for name, tp in _field_types(cls).items():
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, values.get(name, {}))
        elif name in values:
            kwargs[name] = values[name]
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required field was not given
        raise UserError(f"config: {e}") from None


def parse_override(text: str) -> dict[str, Any]:
    """`lora.r=16` -> {'lora': {'r': 16}}; the value is read as YAML (16 -> int, true -> bool)."""
    if "=" not in text:
        raise UserError(f"flag '{text}': write overrides as key=value, e.g. lora.r=16")
    key, raw = text.split("=", 1)
    key = key.strip().lstrip("-").replace("-", "_")
    if not key:
        raise UserError(f"flag '{text}': empty key")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    if value is None and raw.strip().lower() not in ("null", "~"):
        value = raw
    out: dict[str, Any] = {}
    node = out
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def load_config(cls: type[T], recipe: str | Path | None = None, overrides: list[str] = ()) -> T:
    """Defaults < recipe YAML < overrides. Errors name the key, the file or the flag."""
    values: dict[str, Any] = {}
    if recipe is not None:
        path = Path(recipe)
        if not path.is_file():
            raise UserError(f"recipe {path} not found (pass --recipe with a YAML file)")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise UserError(f"recipe {path} is not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise UserError(f"recipe {path}: the top level must be a mapping of keys")
        _merge(cls, values, data, f"recipe {path}")
    for flag in overrides:
        _merge(cls, values, parse_override(flag), f"flag '{flag}'")
    return _build(cls, values)


def to_dict(cfg: Any) -> dict[str, Any]:
    """The resolved config as plain data (paths as strings), for config.yaml and manifests."""

    def plain(v: Any) -> Any:
        if isinstance(v, Path):
            return str(v)
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(cfg))


def dump_yaml(cfg: Any, path: str | Path) -> None:
    """Write the resolved config (a config, or the plain dict a job records: to_dict's, with what the
    job resolved, e.g. lib.train.config.TrainPlan.record); it holds no secrets because configs never hold any."""
    data = cfg if isinstance(cfg, dict) else to_dict(cfg)
    Path(path).write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
