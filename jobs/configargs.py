"""Generate argparse options from a frozen config dataclass, and build the dataclass back from the parsed args.

Each field becomes ``--field-name`` with its ``metadata["help"]``; enums and ``choices`` become choices,
booleans become ``--flag/--no-flag``, ``X | None`` fields accept the word ``none``. Fields with
``metadata["cli"] = False`` are positional or set by the command itself.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from enum import Enum
from typing import Any, TypeVar

T = TypeVar("T")


def _base_type(tp: Any) -> tuple[Any, bool]:
    """(the non-None type, whether None is allowed)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


def add_dataclass_args(parser: argparse.ArgumentParser, cls: type[Any], *, skip: set[str] = frozenset()) -> None:  # type: ignore[assignment]
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip or not f.metadata.get("cli", True):
            continue
        tp, optional = _base_type(hints[f.name])
        flag = "--" + f.name.replace("_", "-")
        default = f.default
        help_ = f.metadata.get("help", "")
        if tp is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_)
            continue
        kw: dict[str, Any] = {"default": default, "dest": f.name}
        if isinstance(tp, type) and issubclass(tp, Enum):
            kw["choices"] = [e.value for e in tp]
            kw["default"] = default.value if isinstance(default, Enum) else default
            kw["type"] = str
        elif "choices" in f.metadata:
            kw["choices"] = list(f.metadata["choices"])
            kw["type"] = tp
        else:
            kw["type"] = (lambda s, tp=tp: None if s.lower() == "none" else tp(s)) if optional else tp
        shown = "none" if kw["default"] is None else kw["default"]
        parser.add_argument(flag, help=f"{help_} (default: {shown})" if shown != "" else help_, **kw)


def dataclass_from_args(cls: type[T], args: argparse.Namespace, **overrides: Any) -> T:
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    values = {k: v for k, v in vars(args).items() if k in names}
    values.update(overrides)
    from_dict = getattr(cls, "from_dict", None)
    return from_dict(values) if from_dict else cls(**values)
