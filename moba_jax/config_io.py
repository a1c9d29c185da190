"""Generic machinery of the config system: frozen-dataclass trees from dicts (nested dataclasses,
tuples, unions, literals, and `Partial` tables: any subset of another tree's keys, typed), dotted
overrides parsed as TOML literals, unknown keys with suggestions and a small TOML writer.
`moba_jax.config` builds the project's Config and ExperimentConfig on it.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import tomllib
import types
import typing
from typing import Annotated, Any, Literal, Sequence, Union

# ----------------------------------------------------------------------------- dict <-> dataclass


@dataclasses.dataclass(frozen=True)
class Partial:
  """Marks a field `Annotated[dict, Partial(Schema)]`: a nested table holding any subset of the
  keys of the dataclass tree `Schema`, each value typed as there (e.g. a grid stage's changes to
  the run config). Kept as a plain nested dict; `merge` applies it to a full tree's dict."""

  schema: type


def _partial(tp) -> Partial | None:
  if typing.get_origin(tp) is Annotated:
    return next((m for m in tp.__metadata__ if isinstance(m, Partial)), None)
  return None


def _hints(cls) -> dict[str, Any]:
  return typing.get_type_hints(cls, include_extras=True)


def _describe(tp) -> str:
  if _partial(tp):
    return "a table of config keys"
  origin, args = typing.get_origin(tp), typing.get_args(tp)
  if origin is tuple:
    return f"a list of {_plural(args[0])}"
  if origin in (Union, types.UnionType):
    arms = lambda t: typing.get_args(t) if typing.get_origin(t) in (Union, types.UnionType) \
        else (t,)
    lists = [a for a in args if typing.get_origin(a) is tuple
             and set(arms(typing.get_args(a)[0])) <= set(args)]
    if lists:  # X or a list of X (a Union flattens X's own arms into it)
      return f"{_describe(typing.get_args(lists[0])[0])}, or a list of them"
    return " or ".join(_describe(a) for a in args)
  if origin is Literal:
    return " or ".join(repr(a) for a in args)
  return {int: "an integer", float: "a number", str: "a string", bool: "true/false"}.get(
      tp, getattr(tp, "__name__", str(tp)))


def _plural(tp) -> str:
  """A list element's description: "strings", "integers", "'a' or 'b' values"."""
  if typing.get_origin(tp) in (Union, types.UnionType):  # "integers or 'all'"
    return " or ".join(_plural(a) for a in typing.get_args(tp))
  if typing.get_origin(tp) is Literal:
    return " or ".join(repr(a) for a in typing.get_args(tp))
  return {int: "integers", float: "numbers", str: "strings", bool: "true/false values"}.get(
      tp, f"{_describe(tp)} values")


def _coerce(tp, value, key: str, root=None):
  """Converts a TOML/JSON value to the field type `tp`; raises ValueError naming `key`."""
  if (part := _partial(tp)) is not None:
    return _coerce_partial(part.schema, value, key)
  origin, args = typing.get_origin(tp), typing.get_args(tp)
  bad = ValueError(f"{key}={value!r} must be {_describe(tp)}")
  if dataclasses.is_dataclass(tp):
    if isinstance(value, tp):
      return value
    if not isinstance(value, dict):
      raise ValueError(f"{key}={value!r} is a section: set its keys ({key}.KEY=...)")
    return _build(tp, value, key + ".", root)
  if origin is tuple:
    if not isinstance(value, (list, tuple)):
      try:  # one element given bare: show the list it would be
        _coerce(args[0], value, key, root)
      except ValueError:
        raise bad from None
      raise ValueError(f"{bad}, e.g. {key}={_toml_value([value])}")
    return tuple(_coerce(args[0], v, f"{key}[{i}]", root) for i, v in enumerate(value))
  if origin in (Union, types.UnionType):
    for arg in args:
      try:
        return _coerce(arg, value, key, root)
      except ValueError:
        pass
    raise bad
  if origin is Literal:
    if value in args:
      return value
    raise bad
  if tp is bool:
    if isinstance(value, bool):
      return value
    raise bad
  if tp is int:
    if isinstance(value, int) and not isinstance(value, bool):
      return value
    raise bad
  if tp is float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
      return float(value)
    raise bad
  if tp is str:
    if isinstance(value, str):
      return value
    raise bad
  return value


def _coerce_partial(schema, value, key: str) -> dict:
  """A Partial table: every key must be one of `schema`'s, every value of its type."""
  if not isinstance(value, dict):
    raise ValueError(f"{key}={value!r} is a table of config keys: set its keys ({key}.KEY=...)")
  hints, out = _hints(schema), {}
  for name, v in value.items():
    if name not in hints:
      raise _unknown(f"{key}.{name}", [f"{key}.{k}" for k in all_keys(schema)])
    tp = hints[name]
    sub = _coerce_partial(tp, v, f"{key}.{name}") if dataclasses.is_dataclass(tp) else None
    out[name] = sub if sub is not None else _coerce(tp, v, f"{key}.{name}")
  return out


def all_keys(cls, prefix: str = "") -> list[str]:
  keys = []
  for name, tp in _hints(cls).items():
    keys.append(prefix + name)
    part = _partial(tp)
    if dataclasses.is_dataclass(tp) or part:
      keys += all_keys(part.schema if part else tp, prefix + name + ".")
  return keys


def _unknown(key: str, valid: Sequence[str]) -> ValueError:
  close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
  if not close:  # try the last component against the leaf names
    leaf = key.rsplit(".", 1)[-1]
    close = [k for k in valid if k.rsplit(".", 1)[-1] in
             difflib.get_close_matches(leaf, [v.rsplit(".", 1)[-1] for v in valid], n=1)]
  hint = f"; did you mean {close[0]!r}?" if close else ""
  section = key.rsplit(".", 1)[0] if "." in key else ""
  keys = [k[len(section) + 1:] for k in valid if k.startswith(section + ".")
          and "." not in k[len(section) + 1:]] if section in valid else []
  if keys and (not close or close[0] == section):  # no better guess than the section itself
    hint = f" ({section} has: {', '.join(keys)})"
  return ValueError(f"unknown config key {key!r}{hint}")


def _build(cls, d: dict, prefix: str = "", root=None):
  hints = _hints(cls)
  kwargs = {}
  for name, value in d.items():
    if name not in hints:
      raise _unknown(prefix + name, all_keys(root) if root else all_keys(cls, prefix))
    kwargs[name] = _coerce(hints[name], value, prefix + name, root or cls)
  return cls(**kwargs)


def build(cls, d: dict, prefix: str = ""):
  """Builds (and validates) a dataclass tree from a nested dict; missing keys take defaults.
  prefix: where the tree sits in a larger file ("grid."), for error messages."""
  if not isinstance(d, dict):
    raise ValueError(f"{prefix.rstrip('.')}={d!r} is a section: set its keys")
  return _build(cls, d, prefix)


def to_dict(cfg) -> dict:
  """Nested dict of plain values (tuples become lists): TOML/JSON-serialisable."""
  def plain(v):
    if dataclasses.is_dataclass(v):
      return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
    if isinstance(v, dict):
      return {k: plain(x) for k, x in v.items()}
    if isinstance(v, (tuple, list)):
      return [plain(x) for x in v]
    return v
  return plain(cfg)


def merge(base: dict, changes: dict) -> dict:
  """A copy of nested dict `base` with the (nested) keys of `changes` set."""
  out = dict(base)
  for k, v in changes.items():
    out[k] = merge(out.get(k) or {}, v) if isinstance(v, dict) else v
  return out


def parse_override(item: str) -> tuple[str, Any]:
  """"a.b=1e-3" -> ("a.b", 0.001); the value is a TOML literal, else the raw string."""
  key, sep, raw = item.partition("=")
  key = key.strip()
  if not sep or not key:
    raise ValueError(f"override {item!r} must look like section.key=value")
  raw = raw.strip()
  try:
    value = tomllib.loads(f"v = {raw}")["v"]
  except tomllib.TOMLDecodeError:
    value = raw
  return key, value


def set_dotted(root, d: dict, key: str, value, prefix: str = "") -> None:
  """d[key] = value for a dotted key that must be a field of the dataclass tree `root` (which sits
  at `prefix` of a larger file, for error messages)."""
  valid = all_keys(root)
  if key not in valid:
    raise _unknown(prefix + key, [prefix + k for k in valid])
  parts = key.split(".")
  for part in parts[:-1]:
    d = d.setdefault(part, {})
    if not isinstance(d, dict):
      raise ValueError(f"override {prefix + key!r}: {part!r} is not a section")
  d[parts[-1]] = value


def check_keys(root, d: dict, prefix: str = "") -> None:
  """Raises for the first key of nested dict d that `root` does not have (with a suggestion)."""
  valid = all_keys(root)
  for k, v in d.items():
    if prefix + k not in valid:
      raise _unknown(prefix + k, valid)
    if isinstance(v, dict):
      check_keys(root, v, prefix + k + ".")
    elif any(key.startswith(f"{prefix}{k}.") for key in valid):
      raise ValueError(f"{prefix}{k}={v!r} is a section: set its keys ([{prefix}{k}] KEY = ...)")


# ----------------------------------------------------------------------------- TOML writer


def _toml_value(v) -> str:
  if isinstance(v, bool):
    return "true" if v else "false"
  if isinstance(v, (int, float)):
    return repr(v) if v == v and abs(v) != float("inf") else str(v)  # TOML: inf, -inf, nan
  if isinstance(v, str):
    return json.dumps(v)
  if isinstance(v, (list, tuple)):
    return "[" + ", ".join(_toml_value(x) for x in v) + "]"
  raise TypeError(f"cannot write {v!r} as TOML")


def to_toml(d: dict, prefix: str = "") -> str:
  """TOML text of a nested dict (scalars first, then one [table] per sub-dict)."""
  lines = [f"{k} = {_toml_value(v)}" for k, v in d.items() if not isinstance(v, dict)]
  out = "\n".join(lines) + ("\n" if lines else "")
  for k, v in d.items():
    if isinstance(v, dict):
      out += f"\n[{prefix}{k}]\n" + to_toml(v, f"{prefix}{k}.")
  return out


