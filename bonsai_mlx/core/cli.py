"""Command-line flags built from a config dataclass: its fields give each option's name, type, default and help.

One dataclass is the source of a command's options, so a default or a help text is written once. A field's
metadata may carry `help`, `choices`, `flags` (extra spellings, e.g. `--student` for `--model`), `cli=False`
(not a flag) and `metavar`. Use `opt(default, "help")` to write such a field in one line.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Iterable
from typing import Any, TypeVar

T = TypeVar("T")


def opt(default: Any = dataclasses.MISSING, help: str = "", **meta: Any) -> Any:
    """A dataclass field with its command-line help (and `choices`, `flags`, `cli`, `metavar`) in metadata."""
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"help": help, **meta})
    return dataclasses.field(default=default, metadata={"help": help, **meta})


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def _base_type(tp: Any) -> tuple[Any, bool]:
    """(the scalar type, whether None is allowed) of an annotation such as `int | None`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return (args[0] if len(args) == 1 else str), True
    return tp, False


def add_options(
    ap: argparse.ArgumentParser | argparse._ArgumentGroup,
    cls: type,
    *,
    suppress: bool = False,
    exclude: Iterable[str] = (),
    required: Iterable[str] = (),
    defaults: dict[str, Any] | None = None,
) -> None:
    """Add one flag per field of `cls`. `suppress`: flags not given stay out of the namespace (so a saved or
    file config can sit underneath); `defaults` overrides shown defaults (e.g. a command's own `--out`)."""
    hints = typing.get_type_hints(cls)
    skip, need, over = set(exclude), set(required), defaults or {}
    for f in dataclasses.fields(cls):
        if f.name in skip or not f.metadata.get("cli", True):
            continue
        tp, optional = _base_type(hints[f.name])
        if f.name in over:
            default = over[f.name]
        elif f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = None
        help_text = f.metadata.get("help", "").replace("%", "%%")  # argparse %-formats help
        if default not in (None, "", False) and not suppress and tp is not bool:
            help_text = f"{help_text} (default: {default})" if help_text else f"(default: {default})"
        kw: dict[str, Any] = {"dest": f.name, "help": help_text}
        if "metavar" in f.metadata:
            kw["metavar"] = f.metadata["metavar"]
        names = [flag_name(f.name), *f.metadata.get("flags", ())]
        if tp is bool:
            if default is True or optional:
                kw["action"] = argparse.BooleanOptionalAction
            else:
                kw["action"] = "store_true"
        else:
            kw["type"] = tp if tp in (int, float) else str
            if "choices" in f.metadata:
                kw["choices"] = f.metadata["choices"]
        if f.name in need:
            kw["required"] = True
        else:
            kw["default"] = argparse.SUPPRESS if suppress else default
        ap.add_argument(*names, **kw)


def given(cls: type, ns: argparse.Namespace) -> dict[str, Any]:
    """The fields of `cls` present in `ns` (with `suppress=True`: those the user gave)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in vars(ns).items() if k in names}


def from_args(cls: type[T], ns: argparse.Namespace, base: dict[str, Any] | None = None) -> T:
    """`cls(**base)` with the flags in `ns` on top; the namespace itself never travels further."""
    return cls(**{**(base or {}), **given(cls, ns)})
