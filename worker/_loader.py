"""``load_worker("module:attr")``: find the Worker the CLI should run."""

from __future__ import annotations

import importlib
import os
import sys

from conveyor.worker._errors import WorkerLoadError
from conveyor.worker._worker import Worker

__all__ = ["load_worker"]

DEFAULT_ATTRIBUTE = "worker"


def load_worker(spec: str, *, add_cwd_to_path: bool = True) -> Worker:
    """Import ``"module[:attr]"`` and return the :class:`Worker` it names.

    ``attr`` defaults to ``worker`` and may be dotted (``"app.tasks:app.worker"``). It
    may name a :class:`Worker` or a factory that takes no arguments and returns one.

    Args:
        spec: ``"package.module"`` or ``"package.module:attribute"``.
        add_cwd_to_path: Put the current directory first on ``sys.path`` when it is
            missing, so that ``conveyor worker myapp.tasks`` finds ``./myapp`` even when
            run through the ``conveyor`` console script (which does not add it).

    Raises:
        WorkerLoadError: The spec is malformed, the module cannot be imported, the
            attribute is missing, or it is not a Worker (nor a factory of one).
    """
    module_name, _, attribute = spec.strip().partition(":")
    module_name = module_name.strip()
    attribute = attribute.strip() or DEFAULT_ATTRIBUTE
    if not module_name or spec.count(":") > 1:
        raise WorkerLoadError(
            f"invalid worker spec {spec!r}: expected MODULE or MODULE:ATTRIBUTE, "
            "e.g. 'myapp.tasks' or 'myapp.tasks:worker'"
        )
    if add_cwd_to_path:
        cwd = os.getcwd()
        if cwd not in sys.path and "" not in sys.path:
            sys.path.insert(0, cwd)

    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        # Tell a missing worker module apart from a missing dependency inside it.
        missing = exc.name or ""
        if missing == module_name or module_name.startswith(missing + "."):
            raise WorkerLoadError(
                f"cannot import worker module {module_name!r}: no module named {missing!r} "
                f"(searched sys.path, which starts with {sys.path[:3]!r})"
            ) from exc
        raise WorkerLoadError(
            f"cannot import worker module {module_name!r}: it imports {missing!r}, which "
            "is not installed"
        ) from exc
    except Exception as exc:
        raise WorkerLoadError(
            f"cannot import worker module {module_name!r}: {type(exc).__name__}: {exc}"
        ) from exc

    target: object = module
    walked: list[str] = []
    for part in attribute.split("."):
        walked.append(part)
        try:
            target = getattr(target, part)
        except AttributeError:
            raise WorkerLoadError(
                f"module {module_name!r} has no attribute {'.'.join(walked)!r}; name the "
                f"Worker explicitly as '{module_name}:ATTRIBUTE'"
            ) from None

    where = f"{module_name}:{attribute}"
    if isinstance(target, Worker):
        return target
    if callable(target):
        try:
            produced = target()
        except Exception as exc:
            raise WorkerLoadError(
                f"worker factory {where} failed: {type(exc).__name__}: {exc}"
            ) from exc
        if isinstance(produced, Worker):
            return produced
        raise WorkerLoadError(
            f"worker factory {where} returned {type(produced).__name__}, not a "
            "conveyor.worker.Worker"
        )
    raise WorkerLoadError(
        f"{where} is a {type(target).__name__}, not a conveyor.worker.Worker (or a "
        "function returning one)"
    )
