"""A name -> object registry that refuses duplicates and names the valid choices on a miss."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from cnnpack.errors import UserInputError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to registered objects (models, exporters, runtimes)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

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
        try:
            return self._items[name]
        except KeyError:
            raise UserInputError(
                f"unknown {self.kind} {name!r}; valid: {', '.join(self.names())}"
            ) from None

    def names(self) -> list[str]:
        return list(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)
