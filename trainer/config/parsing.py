"""Reading a launch config: YAML, `--set section.key=value` overrides (values parsed as YAML), and a
strict check of every value against its field's type, with one-line errors naming the key.

pydantic (already a DeepSpeed dependency) was weighed for this and not taken: its dataclasses do not
read the field docstrings the reference is made from, its lax mode accepts "yes" for a bool and "7"
for an int where a launch config should be refused, and its errors would need this file's wording
anyway; the coercer below is the shorter of the two.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Dict, List, Tuple

import yaml

from .schema import ConfigError, TrainConfig


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check / convert a parsed YAML value against a field's type hint."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):  # X | None
        if value is None:
            return None
        return _coerce(value, next(a for a in args if a is not type(None)), key)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {hint.__name__} fields, got {value!r}")
        return _build(hint, value, key)
    if origin in (tuple, Tuple):
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key}: expected a list of {len(args)} numbers, got {value!r}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin in (dict, Dict):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if origin in (list, List):
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return list(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return int(value)
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads 5e-5 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    return value


def _build(cls: type, data: Dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in hints:
            where = f"{prefix}.{key}" if prefix else key
            scope = f" in {prefix}" if prefix else ""
            raise ConfigError(f"unknown key {where!r}; valid keys{scope}: {', '.join(names)}")
    kwargs = {k: _coerce(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in data.items()}
    return cls(**kwargs)


def config_from_dict(tree: Dict[str, Any]) -> TrainConfig:
    """Rebuild a TrainConfig from its to_dict() form (e.g. the copy stored in a checkpoint)."""
    return _build(TrainConfig, tree)


def _set_override(tree: Dict[str, Any], assignment: str) -> None:
    """Apply one 'a.b.c=value' override (value parsed as YAML) to a nested dict."""
    if "=" not in assignment:
        raise ConfigError(f"override {assignment!r} must look like section.key=value")
    path, raw = assignment.split("=", 1)
    keys = path.strip().split(".")
    node = tree
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {path!r}: {k!r} is not a section")
    node[keys[-1]] = yaml.safe_load(raw) if raw.strip() else ""


def load_config(path: str | None = None, overrides: List[str] | None = None) -> TrainConfig:
    """Read a YAML launch config (or the defaults) and apply --set overrides; validates types."""
    tree: Dict[str, Any] = {}
    if path:
        try:
            with open(path) as f:
                tree = yaml.safe_load(f) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {path} is not valid YAML: {str(err).splitlines()[0]}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections")
    for item in overrides or []:
        _set_override(tree, item)
    return _build(TrainConfig, tree)
