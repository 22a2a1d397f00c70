"""Fast construction of frozen, slotted dataclasses built once per task on a hot path.

A frozen dataclass's generated ``__init__`` sets each field with ``object.__setattr__``
(the class's own ``__setattr__`` refuses): a global lookup, an attribute lookup and a
call per field. The client builds a ``Task`` of 27 fields per submitted task and the
worker a ``TaskContext`` of 17 per attempt; there that was 5 µs of about 13 (issue 19).
:func:`frozen_builder` makes a function that sets the slots through their descriptors
directly: about half the cost, and the same object (equal, hashable, picklable) as the
class's own constructor makes.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from typing import Any, TypeVar, cast

__all__ = ["decoder_on_read", "frozen_builder", "frozen_filler"]

T = TypeVar("T")


def frozen_builder(cls: type[T]) -> Callable[..., T]:
    """A keyword-only constructor of ``cls`` that takes every field (those with
    ``init=False`` included) and no default: a field added to ``cls`` and forgotten at a
    call site fails there (TypeError), not silently.

    Only for slotted dataclasses without ``__post_init__``: nothing is validated or
    derived on the way, exactly as the generated ``__init__`` would do for such a class.
    """
    build: Callable[..., T] = _generate(cls, fill=False)
    build.__qualname__ = f"{cls.__qualname__}._build"
    return build


def frozen_filler(cls: type[T]) -> Callable[..., None]:
    """As :func:`frozen_builder`, but sets every field of an object of ``cls`` that is
    already made (``fill(obj, *, field=value, ...)``): for an object made empty first
    (``object.__new__``) and filled when it is first read (``client.Task``'s answer to
    a submit). The same rules: every field given, slotted, no ``__post_init__``."""
    fill: Callable[..., None] = _generate(cls, fill=True)
    fill.__qualname__ = f"{cls.__qualname__}._fill"
    return fill


def decoder_on_read(
    slot: Any, names: frozenset[str], decode: Callable[[Any, Any], None]
) -> Callable[[Any, str], Any]:
    """The ``__getattr__`` of a slotted class whose fields ``names`` are decoded from a
    kept message when one of them is first read (``client.Task``'s answer to a submit,
    the worker's ``TaskContext``).

    ``slot`` is the member descriptor of the slot that keeps the message, and
    ``decode(obj, message)`` sets every field (with a :func:`frozen_filler`). Python calls
    ``__getattr__`` only for a slot left unset, so this runs until the first read has
    decoded, then never again. Two threads may read at once (a sync handler's thread and
    the event loop): the one that finds the message gone finds the fields set.
    """
    get, delete = slot.__get__, slot.__delete__

    def read(obj: Any, name: str) -> Any:
        if name not in names:
            return object.__getattribute__(obj, name)  # raises the usual error
        try:
            message = get(obj)
        except AttributeError:  # decoded meanwhile, by another thread
            return object.__getattribute__(obj, name)
        decode(obj, message)
        with contextlib.suppress(AttributeError):  # another thread's decoding may have
            delete(obj)  # dropped it first
        return object.__getattribute__(obj, name)

    return read


def _generate(cls: type[T], *, fill: bool) -> Callable[..., Any]:
    if not dataclasses.is_dataclass(cls) or "__slots__" not in cls.__dict__:
        raise TypeError(f"{cls.__name__} is not a slotted dataclass")
    if hasattr(cls, "__post_init__"):
        raise TypeError(f"{cls.__name__} has a __post_init__ that a builder would skip")
    names = [f.name for f in dataclasses.fields(cls)]
    setters = {f"_set_{name}": getattr(cls, name).__set__ for name in names}
    params = ", ".join(names)
    if fill:
        lines = [f"def make(obj, *, {params}):"]
    else:
        lines = [f"def make(*, {params}):", "    obj = _new(_cls)"]
    lines += [f"    _set_{name}(obj, {name})" for name in names]
    lines += [] if fill else ["    return obj"]
    namespace: dict[str, Any] = {"_new": object.__new__, "_cls": cls, **setters}
    exec("\n".join(lines), namespace)
    return cast(Callable[..., Any], namespace["make"])
