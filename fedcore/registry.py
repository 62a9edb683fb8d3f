"""One registry mechanism for every pluggable family (models, partitioners, aggregators, ...)."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, Generic, TypeVar

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])


class Registry(Generic[T]):
    """Map a config name to a factory. One instance per family.

    Parameters
    ----------
    kind : str
        Human name of the family, used in error messages (``"aggregator"``).
    """

    def __init__(self, kind: str) -> None:
        self._kind = kind
        self._factories: dict[str, Callable[..., T]] = {}

    @property
    def kind(self) -> str:
        """Human name of the family."""
        return self._kind

    def register(self, name: str) -> Callable[[F], F]:
        """Return a decorator that registers a factory under ``name`` (lowercase)."""
        if name != name.lower():
            raise ValueError(f"{self._kind}: registry keys are lowercase. Got {name!r}.")

        def add(factory: F) -> F:
            if name in self._factories:
                raise ValueError(f"{self._kind} {name!r} is registered twice.")
            self._factories[name] = factory
            return factory

        return add

    def names(self) -> list[str]:
        """Sorted names of every registered factory."""
        return sorted(self._factories)

    def __contains__(self, name: object) -> bool:
        return name in self._factories

    def get(self, name: str) -> Callable[..., T]:
        """Return the factory registered under ``name``."""
        if name not in self._factories:
            raise ValueError(
                f"Unknown {self._kind} {name!r}. Available: {', '.join(self.names())}."
            )
        return self._factories[name]

    def build(self, name: str, **kwargs: Any) -> T:
        """Build the object registered under ``name`` with ``kwargs``."""
        return self.get(name)(**kwargs)

    def options(self, name: str) -> list[str]:
        """The option names member ``name`` takes: its factory's keyword arguments."""
        parameters = inspect.signature(self.get(name)).parameters.values()
        return [p.name for p in parameters if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]
