"""TODO docstring."""

from __future__ import annotations

import json
import types
import typing
from dataclasses import fields, is_dataclass, replace

from tcsmae.errors import UserError
from tcsmae.plain import to_plain


def _apply(cfg, overrides: dict, where: str):
    """A copy of dataclass `cfg` with (nested) `overrides`; unknown keys and values of the
    wrong type (checked against the field's annotation) -> UserError."""
    if not isinstance(overrides, dict):
        raise UserError(f"{where}: {overrides!r} must be a JSON object of settings like {{\"epochs\": 3}}")
    known = {f.name: f for f in fields(cfg)}
    hints = typing.get_type_hints(type(cfg))
    changes = {}
    for key, value in overrides.items():
        if key not in known:
            raise UserError(f"{where}: unknown key {key!r}; valid keys: {sorted(known)}")
        current = getattr(cfg, key)
        if is_dataclass(current):
            value = _apply(current, value, f"{where}.{key}")
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
    from lists with the annotated length; TypeError when it does not fit."""
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
    if origin is tuple and isinstance(value, (list, tuple)):
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
    """'an integer', 'a list of 2 numbers', ... for messages."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):
        return " or ".join(_type_name(a) for a in args)
    if origin is tuple:
        return ("a list of " + _type_name(args[0]).split(" ", 1)[1] + "s" if args[1:] == (Ellipsis,)
                else f"a list of {len(args)} " + _type_name(args[0]).split(" ", 1)[1] + "s")
    return {bool: "a boolean (true/false)", int: "an integer", float: "a number", str: "a string",
            type(None): "null"}.get(hint, str(hint))
