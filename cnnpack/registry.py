"""A name -> object registry that refuses duplicates and names the valid choices on a miss."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from cnnpack.errors import UserInputError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to registered objects (models, exporters, runtimes)."""

    def __init__(self, kind: str, filled_by: str | None = None) -> None:
        """`filled_by`: the module whose import registers the entries (a plug-in's), imported on the first lookup:
        a registry defined apart from its entries is then never read empty."""
        self.kind, self.filled_by = kind, filled_by
        self._items: dict[str, T] = {}

    def _fill(self) -> None:
        if self.filled_by:
            import importlib

            importlib.import_module(self.filled_by)  # (a lookup within that import finds the module as it is)
            self.filled_by = None  # not before: an import that failed is tried again, not read as an empty registry

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: `@REG.register("onnx")` adds the decorated object under `name`."""

        def add(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._items[name] = obj
            return obj

        return add

    def get(self, name: str) -> T:
        """Returns the object registered as `name`, or raises listing the valid names."""
        self._fill()
        try:
            return self._items[name]
        except KeyError:
            raise UserInputError(
                f"unknown {self.kind} {name!r}; valid: {', '.join(self.names())}"
            ) from None

    def names(self) -> list[str]:
        self._fill()
        return list(self._items)

    def __contains__(self, name: object) -> bool:
        self._fill()
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        self._fill()
        return iter(self._items)
