"""Settings described once, by the frozen config dataclasses, for flags and config files alike.

A field's type is its annotation, its help the string literal under it (read with `ast`),
its command-line flag `flag(...)` in its metadata. `add_flags` gives an argparse parser
those flags (nested dataclasses walked, dests dotted like "model.encoder"), `flag_overrides`
turns the flags given into nested overrides and `apply_settings` applies overrides from
flags and JSON config files alike, checked against the annotations. `invalid` words a
refused value by its flag.
argparse, not jsonargparse or tyro: no new dependency, and the flags must stay exactly as they are.
"""

from __future__ import annotations

import argparse
import ast
import functools
import inspect
import itertools
import json
import textwrap
import types
import typing
from dataclasses import fields, is_dataclass, replace

from tcsmae.errors import UserError
from tcsmae.plain import to_plain

NO_FLAGS = {"flags": False}
"""Metadata of a nested dataclass field whose fields' flags are not this config's."""


def flag(name: str, *, metavar: str | None = None, choices: tuple | None = None, nargs: str | None = None,
         parse: typing.Callable | None = None, required: bool = False) -> dict:
    """Field metadata giving the field the command-line flag `name` (e.g. "--batch-size").

    choices: allowed values where the annotation is wider (a Literal annotation gives its own);
    nargs: for a tuple field (default "*", or the tuple's length); parse: tokens -> value,
    replacing the element conversion of a tuple field; required: the flag must be given.
    """
    spec = {"name": name, "metavar": metavar, "choices": choices, "nargs": nargs, "parse": parse,
            "required": required}
    return {"flag": {k: v for k, v in spec.items() if v not in (None, False)}}


@functools.cache
def field_docs(cls) -> dict[str, str]:
    """{field name: its docstring}: the string literal under each field in `cls`'s source."""
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    docs = {}
    for stmt, after in itertools.pairwise(body):
        if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
                and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)):
            docs[stmt.target.id] = inspect.cleandoc(after.value.value)
    return docs


@functools.cache
def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _flagged(cls, prefix: str = ""):
    """(dest, field, annotation, default, owner class) of every field of `cls` with a flag;
    the fields of nested dataclasses follow those of `cls`, with dotted dests."""
    default = cls()
    nested = []
    for f in fields(cls):
        value = getattr(default, f.name)
        if is_dataclass(value):
            if f.metadata.get("flags", True):
                nested.append((f"{prefix}{f.name}.", type(value)))
        elif "flag" in f.metadata:
            yield prefix + f.name, f, _hints(cls)[f.name], value, cls
    for inner_prefix, inner in nested:
        yield from _flagged(inner, inner_prefix)


def _not_none(hint):
    """`X | None` -> X."""
    if typing.get_origin(hint) in (types.UnionType, typing.Union):
        arms = [a for a in typing.get_args(hint) if a is not type(None)]
        return arms[0] if len(arms) == 1 else hint
    return hint


def _shown(value, name: str) -> str:
    """A default as the help shows it."""
    if isinstance(value, bool):
        return name if value else "--no-" + name.removeprefix("--")
    if isinstance(value, tuple):
        return " ".join(map(str, value)) or "none"
    return str(value)


def add_flags(parser, cls, show_defaults: bool = True) -> None:
    """Add the flags of `cls`'s fields to `parser`. Every flag defaults to None (not given), so
    a given flag overrides a preset or config file; the help is the field's docstring and,
    with `show_defaults`, the field's default."""
    for dest, f, hint, default, owner in _flagged(cls):
        spec = f.metadata["flag"]
        hint = _not_none(hint)
        origin, args = typing.get_origin(hint), typing.get_args(hint)
        text = " ".join(field_docs(owner).get(f.name, "").split())
        if show_defaults and not spec.get("required") and default not in (None, ""):
            text += f" (default: {_shown(default, spec['name'])})"
        kw = {"dest": dest, "default": None, "help": text.replace("%", "%%"),
              **{k: spec[k] for k in ("metavar", "choices", "required") if k in spec}}
        if hint is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif origin is typing.Literal:
            kw.update(choices=args, type=type(args[0]))
        elif origin is tuple:
            kw["nargs"] = spec.get("nargs") or ("*" if args[1:] == (Ellipsis,) else len(args))
            kw["type"] = str if "parse" in spec else args[0]
        elif hint in (int, float):
            kw["type"] = hint
        parser.add_argument(spec["name"], **kw)


def flag_overrides(args, cls) -> dict:
    """The flags of `cls` given in the parsed `args`, as nested overrides for `apply_settings`."""
    overrides: dict = {}
    for dest, f, *_ in _flagged(cls):
        value = getattr(args, dest, None)
        if value is None:
            continue
        parse = f.metadata["flag"].get("parse")
        *parents, leaf = dest.split(".")
        node = overrides
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = parse(value) if parse else value
    return overrides


def invalid(cls, name: str, value, problem: str) -> UserError:
    """The error for field `name` of dataclass `cls` refusing `value`, worded by its flag:
    invalid(FinetuneConfig, "folds", 0, "must be >= 1") -> "--folds 0: must be >= 1"."""
    spec = cls.__dataclass_fields__[name].metadata.get("flag")
    shown = repr(value) if isinstance(value, str) else " ".join(map(str, value)) if isinstance(value, tuple) else value
    return UserError(f"{spec['name']} {shown}: {problem}" if spec else f"{name}={shown}: {problem}")


def apply_settings(cfg, overrides: dict, where: str):
    """A copy of dataclass `cfg` with (nested) `overrides`; unknown keys and values of the
    wrong type (checked against the field's annotation) -> UserError naming `where`."""
    if not isinstance(overrides, dict):
        raise UserError(f"{where}: {overrides!r} must be a JSON object of settings like {{\"epochs\": 3}}")
    known = {f.name: f for f in fields(cfg)}
    hints = _hints(type(cfg))
    changes = {}
    for key, value in overrides.items():
        if key not in known:
            raise UserError(f"{where}: unknown key {key!r}; valid keys: {sorted(known)}")
        current = getattr(cfg, key)
        if is_dataclass(current):
            value = apply_settings(current, value, f"{where}.{key}")
        else:
            try:
                value = _typed(hints[key], value)
            except TypeError:
                raise UserError(f"{where}: {key} = {json.dumps(to_plain(value))} is not "
                                f"{_type_name(hints[key])} (now {json.dumps(to_plain(current))})") from None
        changes[key] = value
    try:
        return replace(cfg, **changes)
    except (TypeError, ValueError) as exc:
        raise UserError(f"{where}: {exc}") from exc


def _typed(hint, value):
    """`value` as the annotated type: ints where int, numbers as float where float, tuples
    from lists with the annotated length, one of a Literal's values; TypeError when it does
    not fit."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):
        for arm in args:
            try:
                return _typed(arm, value)
            except TypeError:
                pass
        raise TypeError(hint)
    if hint is type(None) and value is None:
        return None
    if origin is typing.Literal:
        if any(value == a and type(value) is type(a) for a in args):
            return value
    elif origin is tuple and isinstance(value, (list, tuple)):
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_typed(args[0], v) for v in value)
        if len(value) == len(args):
            return tuple(_typed(a, v) for a, v in zip(args, value))
    elif hint is bool and isinstance(value, bool) or hint is str and isinstance(value, str):
        return value
    elif hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    elif hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    raise TypeError(hint)


def _type_name(hint) -> str:
    """'an integer', 'a list of 2 numbers', 'one of "last", "best"', ... for messages."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):
        return " or ".join(_type_name(a) for a in args)
    if origin is typing.Literal:
        return "one of " + ", ".join(json.dumps(a) for a in args)
    if origin is tuple:
        return ("a list of " + _type_name(args[0]).split(" ", 1)[1] + "s" if args[1:] == (Ellipsis,)
                else f"a list of {len(args)} " + _type_name(args[0]).split(" ", 1)[1] + "s")
    return {bool: "a boolean (true/false)", int: "an integer", float: "a number", str: "a string",
            type(None): "null"}.get(hint, str(hint))
