"""Registries: the classes that configs and checkpoints name, found by name.

A saved model names each layer by the name its class was registered under; a saved optimizer
state names its optimizer; ``fit(model, "cross_entropy", "adam", ...)`` names a loss and an
optimizer. Each kind has one ``Registry``, which the built-in classes join through the same
decorators a user's classes do::

    @xpnet.register_layer                      # under its class name, "Scale"
    class Scale(xpnet.Layer): ...

    @xpnet.register_loss(name="half_squared")  # under a name of its own
    class HalfSquared(xpnet.Loss): ...

Names are matched ignoring case ("adamw" finds AdamW). One name holds one class: registering a
different class under a taken name is refused (registering the same class again changes nothing),
and one class may hold several names (aliases, such as "mse" for MeanSquaredError; the first is
the name it is saved under). A registry reads like a mapping from names to classes, and is
changed only by ``register``; ``lookup`` is the lookup whose error lists the registered names.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

__all__ = ["Registry"]


def _qualified(cls) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


class Registry(Mapping):
    """Classes of one kind (subclasses of ``base``) by name.

    ``kind`` names the kind in messages and in the decorator they point to
    (``@xpnet.register_<kind>``); ``noun`` is what an unknown name is called ("layer type");
    ``use`` says when a class must be registered by ("loaded"); ``default_name(cls)`` gives the
    name a class is registered under when none is given (its class name unless told otherwise).
    """

    def __init__(
        self,
        kind: str,
        base: type,
        *,
        noun: str | None = None,
        use: str = "used by name",
        default_name: Callable[[type], str] | None = None,
    ):
        self.kind = kind
        self.base = base
        self._noun = noun or kind
        self._use = use
        self._default_name = default_name or (lambda cls: cls.__name__)
        self._classes: dict[str, type] = {}  # name as registered → class
        self._folded: dict[str, str] = {}  # name.casefold() → name as registered
        self._names: dict[type, str] = {}  # class → the first name it was registered under

    # ------------------------------------------------------------ changes
    def register(self, cls=None, *, name: str | None = None):
        """Register ``cls`` under ``name`` (by default its class name) and return it unchanged.

        Usable as ``@registry.register`` and as ``@registry.register(name="...")``. A different
        class under a taken name: ValueError naming both; the same class again: a no-op.
        """
        if cls is None:
            return lambda cls: self.register(cls, name=name)
        decorator = f"register_{self.kind}"
        if not isinstance(cls, type):
            hint = f" (to give a name, write @xpnet.{decorator}(name={cls!r}))" if isinstance(cls, str) else ""
            raise TypeError(f"{decorator} takes a class, got {type(cls).__name__} {cls!r}{hint}")
        if not issubclass(cls, self.base):
            raise TypeError(
                f"{decorator} takes a subclass of xpnet.{self.base.__name__}, got {_qualified(cls)}, which is not one"
            )
        if name is None:
            name = self._default_name(cls)
        if not isinstance(name, str) or not name or name != name.strip():
            raise ValueError(f"a {self.kind} name must be a non-empty string without surrounding spaces, got {name!r}")
        taken = self._folded.get(name.casefold())
        if taken is not None:
            holder = self._classes[taken]
            if holder is cls:
                return cls
            raise ValueError(
                f"cannot register {_qualified(cls)} as the {self.kind} {name!r}: that name is taken by "
                f"{_qualified(holder)}{'' if taken == name else f' (as {taken!r})'}; register it under another name "
                f"with @xpnet.{decorator}(name=...) (a class defined again, as by re-running a notebook cell, is "
                "a different class)"
            )
        self._classes[name] = cls
        self._folded[name.casefold()] = name
        self._names.setdefault(cls, name)
        return cls

    # ------------------------------------------------------------ lookups
    def lookup(self, name, *, where: str = "") -> type:
        """The class registered under ``name`` (any case); ValueError listing the registered
        names otherwise (``where`` says where the name came from: " in the model config")."""
        found = self._folded.get(name.casefold()) if isinstance(name, str) else None
        if found is None:
            shown = repr(name)
            shown = shown if len(shown) <= 60 else shown[:60] + "..."
            raise ValueError(
                f"unknown {self._noun} {shown}{where}; registered: {', '.join(self.names())}; a {self.kind} of "
                f"your own must be registered with @xpnet.register_{self.kind} before it is {self._use}"
            )
        return self._classes[found]

    def get(self, name, default=None):
        """The class registered under ``name`` (any case), or ``default`` (as a mapping's get)."""
        return self[name] if name in self else default

    def name_of(self, cls: type) -> str | None:
        """The name ``cls`` is saved under (the first it was registered under), or None."""
        return self._names.get(cls)

    def names(self) -> list[str]:
        """Every registered name (aliases too), sorted ignoring case."""
        return sorted(self._classes, key=str.casefold)

    def __getitem__(self, name: str) -> type:
        found = self._folded.get(name.casefold()) if isinstance(name, str) else None
        if found is None:
            raise KeyError(name)
        return self._classes[found]

    def __contains__(self, name) -> bool:
        return isinstance(name, str) and name.casefold() in self._folded

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._classes)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self.names())})"
