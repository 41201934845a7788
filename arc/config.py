"""Dataclass configs on the command line: every field becomes ``--field value`` with its help.

A field's help lives in ``field(metadata={"help": ...})``. Flags default to "not given", so an
entry point can layer its values: the dataclass defaults, then a preset, then what the user typed.
A bool field's flag works bare (``--resume`` is ``--resume true``) and takes an explicit value too
(``--augment false``).
"""
from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any


def help_field(default: Any, help: str, **kwargs: Any) -> Any:
    """A dataclass field with a default and a one-line help."""
    return dataclasses.field(default=default, metadata={"help": help}, **kwargs)


def _parse_bool(text: str) -> bool:
    low = text.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _converter(tp: Any):
    """The str -> value function for a field's type (int, float, str, bool, or X | None)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        inner = _converter(args[0])

        def optional(text: str):
            return None if text.lower() in ("none", "null", "") else inner(text)

        return optional
    if tp is bool:
        return _parse_bool
    if tp in (int, float, str):
        return tp
    if origin is typing.Literal:
        return str
    raise TypeError(f"no command-line form for field type {tp!r}")


def add_flags(parser: argparse.ArgumentParser, cls: type, title: str, skip: tuple[str, ...] = ()) -> None:
    """One ``--name`` flag (and ``--na-me`` for ``na_me``) per field of ``cls``, under a header;
    absent flags stay absent from the namespace."""
    group = parser.add_argument_group(title)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip or not f.init:
            continue
        tp = hints[f.name]
        choices = list(typing.get_args(tp)) if typing.get_origin(tp) is typing.Literal else None
        default = f.default if f.default is not dataclasses.MISSING else None
        names = [f"--{f.name}"] + ([f"--{f.name.replace('_', '-')}"] if "_" in f.name else [])
        metavar = "true|false" if tp is bool else f.name.upper() if choices is None else None
        bare = dict(nargs="?", const=True) if tp is bool else {}  # a bare --flag is --flag true
        group.add_argument(
            *names,
            dest=f.name,
            type=_converter(tp),
            choices=choices,
            default=argparse.SUPPRESS,
            metavar=metavar,
            help=f"{f.metadata.get('help', '')} (default: {default})",
            **bare,
        )


def parse_value(cls: type, name: str, text: str) -> Any:
    """The value ``--name text`` gives field ``name`` of ``cls`` (as on the command line)."""
    tp = typing.get_type_hints(cls)[name]
    value = _converter(tp)(text)
    choices = typing.get_args(tp) if typing.get_origin(tp) is typing.Literal else None
    if choices and value not in choices:
        raise ValueError(f"--{name}: {text!r} is not one of {list(choices)}")
    return value


def given(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The fields of ``cls`` the user set on the command line."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in vars(args).items() if k in names}


def to_dict(obj: Any) -> dict[str, Any]:
    """A config as a plain dict (for checkpoints and JSON)."""
    return dataclasses.asdict(obj)

