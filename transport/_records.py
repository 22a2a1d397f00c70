"""Frozen, slotted dataclasses made once per task on a hot path, and decoded on first read.

A frozen dataclass's generated ``__init__`` sets each field with ``object.__setattr__``
(the class's own ``__setattr__`` refuses): a global lookup, an attribute lookup and a
call per field. The client makes a ``Task`` of 27 fields per submitted task; there that
was 5 µs of about 13 (issue 19). :func:`frozen_filler` makes a function that sets the
slots through their descriptors directly: about half the cost, and the same object
(equal, hashable, picklable) as the class's own constructor makes. With
:func:`decoder_on_read`, such an object is filled from a kept wire message only when a
field is first read (the client's ``Task`` from a submit, the worker's ``TaskContext``).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from typing import Any, TypeVar, cast

__all__ = ["decoder_on_read", "frozen_filler"]

T = TypeVar("T")


def frozen_filler(cls: type[T]) -> Callable[..., None]:
    """A function that sets every field of an object of ``cls`` already made
    (``fill(obj, *, field=value, ...)``, for an object made empty with ``object.__new__``):
    as the class's constructor would, keyword-only, every field (those with
    ``init=False`` included) and no default, so a field added to ``cls`` and forgotten at
    a call site fails there (TypeError), not silently.

    Only for slotted dataclasses without ``__post_init__``: nothing is validated or
    derived on the way, exactly as the generated ``__init__`` would do for such a class.
    """
    if not dataclasses.is_dataclass(cls) or "__slots__" not in cls.__dict__:
        raise TypeError(f"{cls.__name__} is not a slotted dataclass")
    if hasattr(cls, "__post_init__"):
        raise TypeError(f"{cls.__name__} has a __post_init__ that a filler would skip")
    names = [f.name for f in dataclasses.fields(cls)]
    setters = {f"_set_{name}": getattr(cls, name).__set__ for name in names}
    lines = [f"def fill(obj, *, {', '.join(names)}):"]
    lines += [f"    _set_{name}(obj, {name})" for name in names]
    namespace: dict[str, Any] = dict(setters)
    exec("\n".join(lines), namespace)
    fill = cast(Callable[..., None], namespace["fill"])
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
