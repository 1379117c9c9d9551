"""Command-line options generated from the typed definitions they configure.

Each option of a subcommand is defined once — as a parameter of the function the command
calls (name, type, default, and its line in the docstring's ``Args:`` section) or as a
field of a pydantic model (type, default, ``description``) — and :func:`add_options` turns
that definition into the argparse option. A default changed in ``compute_landscape`` is the
CLI's default the moment it changes; nothing repeats it by hand.

argparse stays the parser (rather than a whole-CLI library such as tyro) because the
subcommands are registered by the modules that implement them and ``gammatrace models``
takes free-form ``--SWITCH VALUE`` pairs; only the per-option repetition is generated.

Example:
    >>> import argparse
    >>> def grid_search(runs: list[str], *, grid: int = 21, extent: float = 1.2, bn: str = "train",
    ...                 fast: bool = False) -> None:
    ...     '''Loss on a grid.
    ...
    ...     Args:
    ...         grid: points per axis
    ...         extent: half-width of the grid
    ...     '''
    >>> p = argparse.ArgumentParser()
    >>> add_options(p, grid_search, skip={"runs"}, choices={"bn": ["train", "eval"]})
    >>> p.parse_args(["--grid", "5", "--bn", "eval", "--fast"])
    Namespace(grid=5, extent=1.2, bn='eval', fast=True)
    >>> option_help(grid_search)["grid"]
    'points per axis'
"""

from __future__ import annotations

import argparse
import inspect
import re
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel


@dataclass(frozen=True)
class Option:
    """One typed option: what :func:`add_options` needs to know about a parameter or field."""

    name: str
    annotation: Any
    default: Any
    help: str


def option_help(fn: Callable[..., Any]) -> dict[str, str]:
    """Per-parameter help from a Google-style ``Args:`` docstring section (continuation lines joined)."""
    doc = inspect.getdoc(fn) or ""
    out: dict[str, str] = {}
    m = re.search(r"^Args:\s*$(.*?)(?=^\S|\Z)", doc, flags=re.M | re.S)
    if not m:
        return out
    current = None
    for line in m.group(1).splitlines():
        item = re.match(r"^\s{2,8}(\w+)(?:\s*\([^)]*\))?:\s*(.*)$", line)
        if item:
            current = item.group(1)
            out[current] = item.group(2).strip()
        elif current and line.strip():
            out[current] = f"{out[current]} {line.strip()}"
    return out


def options_of(source: Callable[..., Any] | type[BaseModel]) -> list[Option]:
    """The typed options of a function (its parameters) or a pydantic model (its fields)."""
    if isinstance(source, type) and issubclass(source, BaseModel):
        return [Option(name, f.annotation, f.default, f.description or "") for name, f in source.model_fields.items()]
    hints = typing.get_type_hints(source)
    helps = option_help(source)
    return [Option(name, hints.get(name, Any), p.default, helps.get(name, ""))
            for name, p in inspect.signature(source).parameters.items()
            if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def parsed(args: argparse.Namespace, source: Callable[..., Any] | type[BaseModel]) -> dict[str, Any]:
    """The parsed values of ``source``'s options, as keyword arguments for it.

    Example:
        >>> def f(a: int = 1, b: str = "x") -> None: ...
        >>> parsed(argparse.Namespace(a=3, other=0), f)
        {'a': 3}
    """
    return {o.name: getattr(args, o.name) for o in options_of(source) if hasattr(args, o.name)}


def _strip_optional(annotation: Any) -> Any:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0] if len(args) == 1 else str
    return annotation


def add_options(parser: argparse.ArgumentParser, source: Callable[..., Any] | type[BaseModel], *,
                only: Iterable[str] | None = None, skip: Iterable[str] = (),
                choices: Mapping[str, Iterable[str]] | None = None, default: Any = inspect.Parameter.empty,
                help_suffix: str = "") -> None:
    """Add ``--name`` options for the parameters (or fields) of ``source``.

    ``only``/``skip`` select them; ``choices`` restricts values (e.g. registry names);
    ``default`` overrides every selected default (e.g. ``None``: "the run's own setting",
    said in ``help_suffix``). Booleans become flags (``--no-x`` where the default is true).
    """
    only = set(only) if only is not None else None
    skip, choices = set(skip), dict(choices or {})
    for opt in options_of(source):
        if opt.name in skip or (only is not None and opt.name not in only):
            continue
        value = opt.default if default is inspect.Parameter.empty else default
        required = value is inspect.Parameter.empty
        flag = "--" + opt.name.replace("_", "-")
        kind = _strip_optional(opt.annotation)
        shown = "" if required or value is None or kind is bool else f" (default: {value})"
        text = (opt.help + shown + help_suffix).strip()
        if kind is bool:
            action = argparse.BooleanOptionalAction if value is True else "store_true"
            parser.add_argument(flag, dest=opt.name, action=action, default=bool(value), help=text)
            continue
        kwargs: dict[str, Any] = {"dest": opt.name, "help": text}
        if typing.get_origin(kind) is Literal:
            kwargs["choices"] = list(typing.get_args(kind))
            kind = type(kwargs["choices"][0])
        if typing.get_origin(kind) in (list, tuple):
            kwargs["nargs"] = "+"
            kind = typing.get_args(kind)[0] if typing.get_args(kind) else str
        if opt.name in choices:
            kwargs["choices"] = list(choices[opt.name])
        kwargs["type"] = kind if kind in (int, float, str, Path) else str
        if required:
            kwargs["required"] = True
        else:
            kwargs["default"] = value
        parser.add_argument(flag, **kwargs)
