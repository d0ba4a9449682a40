"""Strict loading of YAML into typed dataclasses; nothing here knows about Imagen.

``build(cls, raw, source)`` turns a mapping read from YAML into an instance of the
dataclass ``cls`` (nested dataclasses, lists, ``Literal`` choices, ``Optional`` values and
unions selected by a ``type`` key), rejecting unknown keys (suggesting the nearest valid
one), wrong types, missing required values and whatever a dataclass's ``validate()``
refuses through :func:`require`. Every message names the source (file or ``--set``
argument) and the key path, e.g. ``unet.channel_mults``. The YAML dialect is strict:
duplicate keys are errors, only ``true``/``false`` are booleans and ``1e-4`` is a number.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, Sequence, Union

import yaml

from imagen.errors import ImagenError


class ConfigError(ImagenError):
    """A config file, a ``--set`` override or a config dict that cannot be used."""


class Invalid(Exception):
    """Raised by ``validate`` methods: ``key`` (relative to the section) is impossible."""

    def __init__(self, key: str, expected: str):
        super().__init__(key, expected)
        self.key = key
        self.expected = expected


def require(condition: bool, key: str, expected: str) -> None:
    """In a dataclass's ``validate()``: refuse the value of ``key`` unless ``condition``,
    saying what was ``expected``."""
    if not condition:
        raise Invalid(key, expected)


def _describe(annotation: Any) -> str:
    """Human wording of a type annotation, for "expected ..." messages."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is bool:
        return "true or false"
    if annotation is int:
        return "an integer"
    if annotation is float:
        return "a finite number"
    if annotation is str:
        return "a string"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is list:
        item = _describe(args[0])
        return "a list of " + re.sub(r"^an? ", "", item) + ("s" if not item.startswith("one of") else "")
    if origin in (Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:
            return _describe(options[0]) + " or null"
        return "a mapping with a 'type' key"
    if dataclasses.is_dataclass(annotation):
        return "a mapping of keys"
    return str(annotation)


def _type_name(value: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
            dict: "a mapping", type(None): "null"}.get(type(value), type(value).__name__)


class _Context:
    """Where the raw values came from, so messages name the file or the ``--set`` argument."""

    def __init__(self, source: str, overrides: dict[str, str] | None = None):
        self.source = source
        self.overrides = overrides or {}

    def origin(self, path: str) -> str:
        for key, argument in self.overrides.items():
            if path == key or path.startswith(key + ".") or key.startswith(path + "."):
                return f"{self.source} (overridden by --set {argument})"
        return self.source

    def error(self, path: str, message: str) -> ConfigError:
        return ConfigError(f"{self.origin(path)}: {message}")

    def wrong_value(self, path: str, expected: str, value: Any) -> ConfigError:
        shown = repr(value)
        if isinstance(value, dict) or len(shown) > 80:
            shown = _type_name(value)
        return self.error(path, f"invalid value for '{path}': expected {expected}, got {shown}.")


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _convert(annotation: Any, value: Any, path: str, ctx: _Context) -> Any:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is bool:
        if isinstance(value, bool):
            return value
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif annotation is float:
        # .nan and .inf are YAML floats too; no setting here means anything by them.
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
    elif annotation is str:
        if isinstance(value, str):
            return value
    elif origin is Literal:
        if value in args and isinstance(value, str):
            return value
        close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ctx.error(path, f"invalid value for '{path}': expected {_describe(annotation)}, got {value!r}{hint}.")
    elif origin is list:
        if isinstance(value, list):
            return [_convert(args[0], item, f"{path}[{i}]", ctx) for i, item in enumerate(value)]
    elif origin in (Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        if value is None and len(options) < len(args):
            return None
        if len(options) == 1:
            return _convert(options[0], value, path, ctx)
        return _build_tagged(options, value, path, ctx)
    elif dataclasses.is_dataclass(annotation):
        return _build(annotation, value, path, ctx)
    raise ctx.wrong_value(path, _describe(annotation), value)


def _build_tagged(variants: Sequence[type], value: Any, path: str, ctx: _Context) -> Any:
    """A section whose ``type`` key selects the dataclass (e.g. ``unet.type``)."""
    if not isinstance(value, dict):
        raise ctx.wrong_value(path, "a mapping of keys", value)
    by_type = {typing.get_args(typing.get_type_hints(v)["type"])[0]: v for v in variants}
    chosen = value.get("type", next(iter(by_type)))
    if chosen not in by_type:
        close = difflib.get_close_matches(str(chosen), list(by_type), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ctx.error(
            _join(path, "type"),
            f"invalid value for '{_join(path, 'type')}': expected one of "
            f"{', '.join(repr(t) for t in by_type)}, got {chosen!r}{hint}.",
        )
    return _build(by_type[chosen], value, path, ctx)


def _build(cls: type, value: Any, path: str, ctx: _Context) -> Any:
    if not isinstance(value, dict):
        raise ctx.wrong_value(path or "<top level>", "a mapping of keys", value)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in value:
        if key not in fields:
            key_path = _join(path, str(key))
            close = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.6)
            hint = f"; did you mean '{_join(path, close[0])}'?" if close else "."
            where = f"'{path}'" if path else "a stage file"
            if path and "type" in fields:
                where += f" (type {getattr(cls, 'type', '')!r})"
            raise ctx.error(
                key_path,
                f"unknown key '{key_path}'{hint} Valid keys in {where}: {', '.join(fields)}.",
            )
    kwargs = {}
    for name, spec in fields.items():
        key_path = _join(path, name)
        if name in value:
            kwargs[name] = _convert(hints[name], value[name], key_path, ctx)
        elif spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING:
            raise ctx.error(key_path, f"missing required key '{key_path}' ({_describe(hints[name])}).")
    instance = cls(**kwargs)
    validate = getattr(instance, "validate", None)
    if validate is not None:
        try:
            validate()
        except Invalid as invalid:
            key_path = _join(path, invalid.key)
            raise ctx.wrong_value(key_path, invalid.expected, _lookup(instance, invalid.key)) from None
    return instance


def _lookup(instance: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        instance = getattr(instance, part)
    return instance


class _StrictYamlLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys (PyYAML silently keeps the last one) and
    reads ``1e-4`` as a number (YAML 1.1 would read it as a string)."""


def _construct_mapping_without_duplicates(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict:
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (each key may appear once)", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=True)


# YAML 1.1 also reads yes/no/on/off as booleans (so `mixed_precision: no` would be False);
# like YAML 1.2, only true/false are booleans here.
_StrictYamlLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_StrictYamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
_StrictYamlLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping_without_duplicates)
_StrictYamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def parse_yaml(text: str, source: str) -> Any:
    """Parse YAML text; a syntax error becomes a :class:`ConfigError` with its line number."""
    try:
        return yaml.load(text, Loader=_StrictYamlLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{source}: invalid YAML{where}: {problem}.") from None


def read_yaml_file(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        folder = " — it is a folder" if path.is_dir() else ""
        raise ConfigError(f"{path}: config file not found (expected a YAML file{folder}).")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the config file ({exc}).") from None
    raw = parse_yaml(text, str(path))
    if raw is None:  # more often a wrong or truncated file than a wish for every default
        raise ConfigError(f"{path}: the config file is empty (or only comments); expected a YAML mapping of "
                          "settings, or {} to take every default.")
    return raw


def parse_override(argument: str) -> tuple[str, Any]:
    """``'training.batch_size=64'`` -> ``('training.batch_size', 64)``; the value is read as YAML."""
    key, sep, raw = argument.partition("=")
    key = key.strip()
    if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", key):
        raise ConfigError(
            f"--set {argument}: expected KEY=VALUE with a dotted key path, e.g. --set training.batch_size=64."
        )
    return key, parse_yaml(raw, f"--set {argument}")


def apply_overrides(raw: dict, overrides: Sequence[str]) -> dict[str, str]:
    """Write each ``--set key.path=value`` into ``raw`` (in place); returns {key path: argument}."""
    if isinstance(overrides, (str, dict)) or not isinstance(overrides, Sequence):
        raise ConfigError(f"overrides: expected a list of 'key.path=value' strings, got {overrides!r} "
                          f"({type(overrides).__name__}); one override is written ['key.path=value'].")
    applied = {}
    for argument in overrides:
        key, value = parse_override(argument)
        node = raw
        parts = key.split(".")
        for depth, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                prefix = ".".join(parts[: depth + 1])
                raise ConfigError(f"--set {argument}: '{prefix}' is a single value, not a section with keys.")
            node = child
        node[parts[-1]] = value
        applied[key] = argument
    return applied


def build(cls: type, raw: Any, source: str, overrides: Sequence[str] = ()) -> Any:
    """An instance of the dataclass ``cls`` from ``raw`` (a mapping as read from YAML; None is
    empty) after applying ``--set key.path=value`` ``overrides``; ``source`` names where the
    values came from in messages."""
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        keys = ", ".join(field.name for field in dataclasses.fields(cls))
        raise ConfigError(f"{source}: expected a mapping of keys ({keys}), got {_type_name(raw)}.")
    return _build(cls, raw, "", _Context(source, apply_overrides(raw, overrides)))


def to_dict(instance: Any) -> dict:
    """Plain dict of a dataclass instance (lists, numbers, strings), ready for YAML or JSON."""
    return dataclasses.asdict(instance)


def to_yaml(instance: Any) -> str:
    return yaml.safe_dump(to_dict(instance), sort_keys=False, default_flow_style=None)
