"""Named registries: every extension point (activation, model, optimizer, ...) is a
factory looked up by name, so a config selects techniques without if-chains and a
new technique is one decorated function plus one row in the table-driven tests.

Example:
    >>> from gammatrace.registry import Registry
    >>> SQUARES = Registry("square")
    >>> @SQUARES.register("two")
    ... def two():
    ...     return 4
    >>> SQUARES.get("two")()
    4
    >>> SQUARES.get("three")
    Traceback (most recent call last):
    ...
    gammatrace.registry.UnknownNameError: unknown square 'three'; choose one of: two
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from gammatrace.errors import UserError

# Mostly factories (typed by their Protocol); a few registries hold values (IMAGE_TARGETS).
F = TypeVar("F")


class UnknownNameError(UserError, KeyError, ValueError):
    """A config named something no registry entry provides."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it plain
        return str(self.args[0])


class Registry(Generic[F]):
    """A mapping name -> factory with a clear error for unknown names.

    Typed by the factory's Protocol (``Registry[OptimizerFactory]``), so each extension
    point states its own signature instead of one shared catch-all.
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, F] = {}

    def register(self, *names: str) -> Callable[[F], F]:
        def deco(fn: F) -> F:
            for name in names or (fn.__name__,):
                if name in self._entries:
                    raise ValueError(f"{self.kind} '{name}' is registered twice")
                self._entries[name] = fn
            return fn

        return deco

    def get(self, name: str) -> F:
        try:
            return self._entries[name]
        except (KeyError, TypeError):  # TypeError: a list or a map where a name belongs
            raise UnknownNameError(
                f"unknown {self.kind} '{name}'; choose one of: {', '.join(sorted(self._entries))}"
            ) from None

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)
