"""Loading a run configuration: YAML (strict, with file:line in errors), dotted command-line
overrides, the one-of rule of `schema._EXCLUSIVE` on the raw tree, then `Config.validate`.
The schema itself, and every check that needs only a built config, live in `i2v.config.schema`."""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import types
import typing
from typing import Any, Literal

import yaml

from i2v.config.schema import _EXCLUSIVE, RENAMED, REQUIRED, Config, _is_set, _keep_either
from i2v.core.errors import ConfigError


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str, src: "_Source | None" = None) -> Any:
    """Check `value` against the annotation `tp`; ints are accepted where floats are expected."""
    at = src.at(*key.rpartition(".")[::2]) if src else ""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(tp):
            return None
        for arm in typing.get_args(tp):
            if arm is type(None):
                continue
            try:
                return _coerce(value, arm, key, src)
            except ConfigError:
                pass
    elif origin is Literal:
        if value in typing.get_args(tp):
            return value
        new = RENAMED.get(key, {}).get(value)
        if new is not None:
            raise ConfigError(f"{key}: {value!r}{at} is now called {new!r}; write {key}: {new}")
        close = difflib.get_close_matches(str(value), [str(a) for a in typing.get_args(tp)], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"{key}: got {value!r}{at}, expected {_type_name(tp)}{hint}")
    elif dataclasses.is_dataclass(tp):
        if isinstance(value, dict):
            return _build(tp, value, key, src)
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp in (str, bool, list, dict):
        if isinstance(value, tp):
            return value
    else:  # pragma: no cover - a programming error in the schema
        raise TypeError(f"unsupported config annotation {tp!r} at {key}")
    raise ConfigError(f"{key}: got {value!r} ({type(value).__name__}){at}, expected {_type_name(tp)}")


def _unknown_key(prefix: str, key: Any, names: list[str], at: str = "") -> ConfigError:
    """The one message for a misspelled key, in a file (`at` names file and line) or an override."""
    dotted = f"{prefix}.{key}" if prefix else str(key)
    close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.6)
    hint = f" Did you mean '{prefix + '.' if prefix else ''}{close[0]}'?" if close else ""
    head = str(key).split(".")[0]
    if at and "." in str(key) and head in names:
        # `train.lr: 0.1` in a file: dotted keys are for the command line only.
        hint = f" YAML keys do not take dots: write '{head}:' with '{str(key).split('.', 1)[1]}:' indented below it."
    return ConfigError(f"{dotted}: unknown key{at}.{hint} Known keys here: {', '.join(names)}")


def _build(cls: type, data: dict, prefix: str, src: "_Source | None" = None) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            raise _unknown_key(prefix, key, names, src.at(prefix, key) if src else "")
    kwargs = {}
    for f in dataclasses.fields(cls):
        dotted = f"{prefix}.{f.name}" if prefix else f.name
        if f.name in data:
            kwargs[f.name] = _coerce(data[f.name], hints[f.name], dotted, src)
        elif dataclasses.is_dataclass(hints[f.name]):
            kwargs[f.name] = _build(hints[f.name], {}, dotted)
    obj = cls(**kwargs)
    for f in dataclasses.fields(cls):
        if getattr(obj, f.name) is REQUIRED:
            dotted = f"{prefix}.{f.name}" if prefix else f.name
            raise ConfigError(f"{dotted}: required but not set ({f.metadata.get('help', '')})")
    return obj


def _apply_override(data: dict, item: str) -> str:
    """Set `dotted.key=value` in `data`; returns the dotted key."""
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected dotted.key=value, e.g. train.max_steps=40")
    key, _, raw = item.partition("=")
    key = key.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"{key}: cannot parse override value {raw!r}: {e}") from None
    # Walk the schema alongside the data so that a typo is caught with its full dotted key.
    node, cls = data, Config
    parts = key.split(".")
    for i, part in enumerate(parts):
        path = ".".join(parts[: i + 1])
        if cls is not None:
            names = [f.name for f in dataclasses.fields(cls)]
            if part not in names:
                raise _unknown_key(".".join(parts[:i]), part, names)
            tp = typing.get_type_hints(cls)[part]
            cls = tp if dataclasses.is_dataclass(tp) else None
        if i == len(parts) - 1:
            node[part] = value
            return key
        else:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"{path}: is {child!r}, cannot set a sub-key on it")
            node = child


class _StrictLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key set twice in one mapping (PyYAML keeps the last silently)
    and remembers the line of every key, by dotted path, for error messages."""

    def __init__(self, stream, name: str):
        super().__init__(stream)
        self.name = name
        # (dotted path of the mapping, key) -> line (1-based) of the key: a key that holds dots
        # (`train.lr:` at the top level) stays apart from the nested one.
        self.lines: dict[tuple[str, str], int] = {}
        self._paths: dict[int, str] = {}  # id(mapping node) -> its dotted path

    def construct_document(self, node):
        self._index(node, "")
        return super().construct_document(node)

    def _index(self, node, path: str) -> None:
        if isinstance(node, yaml.MappingNode):
            if id(node) in self._paths:  # an alias of a mapping seen already
                return
            self._paths[id(node)] = path
            for key, value in node.value:
                if isinstance(key, yaml.ScalarNode):
                    self.lines.setdefault((path, key.value), key.start_mark.line + 1)
                    self._index(value, f"{path}.{key.value}" if path else key.value)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                self._index(item, f"{path}[{i}]")

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            path, seen = self._paths.get(id(node), ""), {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # keys beside a `<<` merge override it
                    continue
                key, line = self.construct_object(key_node, deep=True), key_node.start_mark.line + 1
                try:
                    first = seen.get(key)
                except TypeError:  # an unhashable key: SafeConstructor reports it
                    continue
                if first is not None:
                    dotted = f"{path}.{key}" if path else str(key)
                    where = f"on line {line}" if first == line else f"at lines {first} and {line}"
                    raise ConfigError(f"{self.name}: {dotted} is set twice {where}; delete one of them")
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


class _Source:
    """Where the keys of a config file were set, for messages: `configs/x.yaml:12`."""

    def __init__(self, name: str, lines: dict[tuple[str, str], int]):
        self.name, self.lines = name, lines

    def line(self, parent: str, key: Any) -> int | None:
        return self.lines.get((parent, str(key)))

    def at(self, parent: str, key: Any) -> str:
        """' at configs/x.yaml:12' for the key `key` of the mapping at dotted path `parent`, or ''."""
        line = self.line(parent, key)
        return f" at {self.name}:{line}" if line else ""

    def forget(self, dotted: str) -> None:
        """An override replaced `dotted` (and what is below it): the file no longer sets them."""
        for parent, key in list(self.lines):
            full = f"{parent}.{key}" if parent else key
            if full == dotted or full.startswith(dotted + "."):
                del self.lines[parent, key]


def _read_yaml(path: str | os.PathLike) -> tuple[dict, _Source]:
    name = os.fspath(path)
    with open(path) as f:
        loader = _StrictLoader(f, name)
        try:
            data = loader.get_single_data() or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{name}: not valid YAML: {e}") from None
        finally:
            loader.dispose()
    if not isinstance(data, dict):
        raise ConfigError(f"{name}: expected a mapping at the top level, got {type(data).__name__}")
    return data, _Source(name, loader.lines)


def _named(key: str, overrides: list[str]) -> bool:
    """Whether an override set `key`, a key below it, or a section holding it."""
    return any(k == key or k.startswith(key + ".") or key.startswith(k + ".") for k in overrides)


def _resolve_exclusive(data: dict, overrides: list[str], src: _Source | None) -> None:
    """The one-of rule of `_EXCLUSIVE` on the raw tree: a member set on the command line drops the
    members it excludes that came from the file; two set in the same place are an error naming the fix."""
    for section, pairs in _EXCLUSIVE.items():
        node = data
        for part in section.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict):
            continue  # absent, or a wrong type that _build reports
        for a, b in pairs:
            for mine, other in ((a, b), (b, a)):
                if (_is_set(node.get(mine)) and _named(f"{section}.{mine}", overrides)
                        and not _named(f"{section}.{other}", overrides)):
                    node.pop(other, None)
        for a, b in pairs:
            if not (_is_set(node.get(a)) and _is_set(node.get(b))):
                continue
            head = f"{section}.{a}: set only one of {section}.{a} and {section}.{b}: both are set"
            if _named(f"{section}.{a}", overrides):
                raise ConfigError(f"{head} on the command line; drop one of the two overrides")
            where = ""
            if src is not None:
                lines = [src.line(section, m) for m in (a, b)]
                where = f" in {src.name}" + (f" (lines {lines[0]} and {lines[1]})" if all(lines) else "")
            raise ConfigError(f"{head}{where}; delete one of the two lines, or choose on the command line: "
                              + _keep_either(section, a, b, "add"))


def load_config(path: str | os.PathLike | None, overrides: list[str] = ()) -> Config:
    """Load YAML (or start from defaults when `path` is None), apply overrides, validate."""
    data: dict = {}
    src = None
    if path is not None:
        if not os.path.isfile(path):
            raise ConfigError(f"--config: file not found: {path}")
        data, src = _read_yaml(path)
    keys = [_apply_override(data, item) for item in overrides]
    if src is not None:
        for key in keys:
            src.forget(key)
    _resolve_exclusive(data, keys, src)
    return _build(Config, data, "", src).validate()


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(data: dict) -> Config:
    return _build(Config, data, "").validate()


def dump_yaml(cfg: Config, path: str | os.PathLike) -> None:
    """Write the resolved config atomically (another run reads it)."""
    from i2v.core.fsutil import write_text_atomic

    write_text_atomic(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))




def parse_args(argv: list[str] | None = None, description: str = "", extra=None):
    """Parse `--config FILE key=value ...` (plus launcher-specific flags added by `extra`).

    Returns (config, args). Unknown `--flags` are errors; DeepSpeed's `--local_rank` is accepted.
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", required=True, help="YAML config file, e.g. configs/tiny.yaml")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    if extra is not None:
        extra(parser)
    parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. train.max_steps=40")
    args = parser.parse_args(argv)
    return load_config(args.config, args.overrides), args
