"""Closed registries: names from a config resolve here, never through dotted imports."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Generic, TypeVar

from shieldtune.errors import ConfigError

__all__ = ["Registry"]

T = TypeVar("T")
_NAME = re.compile(r"^[a-z][a-z0-9_\-]*$")


class Registry(Generic[T]):
    """A named table of components. Registration refuses duplicate or malformed names.

    Args:
        kind: What the registry holds ("model preset", "adapter"...), used in error messages.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str, item: T) -> T:
        """Add ``item`` under ``name``.

        Raises:
            ValueError: The name is malformed or already taken (a programming error).
        """
        if not _NAME.match(name):
            raise ValueError(f"{self.kind} name {name!r} is malformed (want [a-z][a-z0-9_-]*)")
        if name in self._items:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._items[name] = item
        return item

    def get(self, name: str, field: str | None = None) -> T:
        """Look ``name`` up.

        Raises:
            ConfigError: Unknown name; the message lists the accepted names.
        """
        try:
            return self._items[name]
        except KeyError:
            where = f"{field}: " if field else ""
            raise ConfigError(
                f"{where}unknown {self.kind} {name!r}; accepted: {', '.join(self.names())}"
            ) from None

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
