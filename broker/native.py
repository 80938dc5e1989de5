"""The compiled hot modules: whether this process runs them, and why not when it does not.

Theory of operation
-------------------
The modules on the per-publication and per-delivery path (:data:`MODULES`: frames, protocol,
router, sendqueue) can be compiled to C extensions with mypyc: ``make compile`` in a checkout,
or ``TRIO_PUBSUB_COMPILE=1`` when installing (``setup.py``). Their Python source stays the
source of truth: the extensions are built from it, sit beside it, and are used only while they
are what the source says. Without them everything runs as pure Python, the default.

Python imports an extension in preference to the ``.py`` beside it, so an extension left over
from before an edit would silently run the old code: a developer who edits ``frames.py`` and
runs the tests would test the old frames. So the build writes :data:`MANIFEST` (the SHA-256 of
each source it compiled and the interpreter's cache tag) once every extension is built, and
:func:`select`, called by the package's ``__init__`` before any of the modules is imported,
compares it with the sources. The compiled modules are used only all together (compiled code
calls across them directly, not through their module objects, so a mix would run two versions
of one function): when any source differs, an extension or the manifest is missing, or they
were built for another interpreter, every one of them is loaded from its source instead (a
finder put first on :data:`sys.meta_path`) and :data:`status` says why. The broker logs that
at start (:mod:`broker.supervisor`), as a warning when the extensions are stale.

``TRIO_PUBSUB_COMPILED`` (:data:`ENV`) chooses: unset or ``auto``, compiled when current, else
pure Python; ``0``, pure Python; ``1``, compiled, or :class:`ImportError` with the reason (the
test run of the compiled modules sets it, so that it cannot pass on pure Python by accident).

What compiling asks of the modules' code is little: a class that an attrs field of a compiled
module names must be imported at run time, not for the type checker only (mypyc issue 1209: the
import crashes otherwise; hence the router's import of ``SendQueue``), and a compiled class can be
subclassed from Python only if it says so (``SendQueue`` does, for the tests' stand-ins).

``setup.py`` loads this file on its own in a bare build environment, so it uses the standard
library only (hence a ``NamedTuple``, not attrs).
"""

from __future__ import annotations

import hashlib
import importlib.abc
import importlib.machinery
import importlib.util
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol, TypeVar

__all__ = [
    "ENV",
    "GROUP",
    "MANIFEST",
    "MODULES",
    "Status",
    "check",
    "log_status",
    "manifest_text",
    "mypyc_attr",
    "select",
    "status",
]

#: The compiled modules of the ``broker`` package, and the name of the shared library that
#: mypyc puts their code in (``<GROUP>__mypyc``, beside them).
MODULES = ("frames", "protocol", "router", "sendqueue")
GROUP = "native"
#: Written by the build beside the extensions: what they were compiled from.
MANIFEST = "native.json"
ENV = "TRIO_PUBSUB_COMPILED"
SETTINGS = ("auto", "0", "1")


class Status(NamedTuple):
    """``compiled``: the process runs the compiled modules; else ``reason`` says why not, and
    ``stale`` whether extensions are there that could not be used (left from an older source,
    an incomplete build, another interpreter)."""

    compiled: bool
    reason: str
    stale: bool = False


#: This process's choice, set by :func:`select` when the package is imported.
status = Status(False, "not selected")


def source_digests(package_dir: Path, modules: Sequence[str] = MODULES) -> dict[str, str]:
    """The SHA-256 of each module's source in ``package_dir``."""
    return {
        name: hashlib.sha256((package_dir / f"{name}.py").read_bytes()).hexdigest()
        for name in modules
    }


def manifest_text(digests: dict[str, str]) -> str:
    """The manifest a build writes for extensions compiled from sources with ``digests``."""
    return json.dumps({"cache_tag": sys.implementation.cache_tag, "sources": digests}, indent=1)


def _extensions(package_dir: Path, name: str) -> list[Path]:
    """The extension files this interpreter would import for ``name`` in ``package_dir``."""
    paths = (package_dir / f"{name}{suffix}" for suffix in importlib.machinery.EXTENSION_SUFFIXES)
    return [path for path in paths if path.exists()]


def check(package_dir: Path, modules: Sequence[str] = MODULES) -> Status:
    """Whether the extensions of ``modules`` in ``package_dir`` can be used: all there, with a
    manifest for this interpreter that matches every source."""
    names = [*modules, f"{GROUP}__mypyc"]
    built = [name for name in names if _extensions(package_dir, name)]
    if not built:
        return Status(False, "not compiled (make compile builds the extensions)")
    if len(built) < len(names):
        missing = ", ".join(name for name in names if name not in built)
        return Status(False, f"extensions missing for {missing}: make compile rebuilds them", True)
    try:
        manifest = json.loads((package_dir / MANIFEST).read_text())
        tag, recorded = manifest["cache_tag"], manifest["sources"]
    except (OSError, ValueError, KeyError, TypeError):
        return Status(False, f"{MANIFEST} missing or unreadable: make compile rebuilds it", True)
    if tag != sys.implementation.cache_tag:
        return Status(False, f"compiled for {tag}, not {sys.implementation.cache_tag}", True)
    digests = source_digests(package_dir, modules)
    changed = [f"{name}.py" for name in modules if recorded.get(name) != digests[name]]
    if changed:
        reason = f"{', '.join(changed)} changed since compiled: make compile rebuilds them"
        return Status(False, reason, True)
    return Status(True, "")


class _SourceFinder(importlib.abc.MetaPathFinder):
    """Finds the compiled modules' ``.py`` files, so that the extensions beside them are not
    imported."""

    def __init__(self, package: str, package_dir: Path, modules: Sequence[str]) -> None:
        self._sources = {f"{package}.{name}": package_dir / f"{name}.py" for name in modules}

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        source = self._sources.get(fullname)
        if source is None:
            return None
        return importlib.util.spec_from_file_location(fullname, source)


def select(
    package: str = "broker",
    package_dir: Path | None = None,
    modules: Sequence[str] = MODULES,
    setting: str | None = None,
) -> Status:
    """Choose compiled or pure Python for ``modules`` of ``package`` (before any of them is
    imported), following ``setting`` (default: the environment's :data:`ENV`); remember and
    return the choice. Raises :class:`ImportError` when the setting is not one of
    :data:`SETTINGS`, or is ``1`` and the extensions cannot be used."""
    global status
    if package_dir is None:
        package_dir = Path(__file__).resolve().parent
    if setting is None:
        setting = os.environ.get(ENV, "") or "auto"
    if setting not in SETTINGS:
        raise ImportError(f"{ENV} must be one of {', '.join(SETTINGS)}, not {setting!r}")
    found = Status(False, f"{ENV}=0") if setting == "0" else check(package_dir, modules)
    if setting == "1" and not found.compiled:
        raise ImportError(f"{ENV}=1, but the compiled modules cannot be used: {found.reason}")
    if not found.compiled and any(_extensions(package_dir, name) for name in modules):
        sys.meta_path.insert(0, _SourceFinder(package, package_dir, modules))
    status = found
    return found


_C = TypeVar("_C")


class _Logger(Protocol):
    def info(self, event: str, **fields: Any) -> Any: ...
    def warning(self, event: str, **fields: Any) -> Any: ...


def log_status(log: _Logger) -> None:
    """One log line, ``compiled_modules``: whether this process runs the compiled modules, and
    if not why; a warning when extensions are there but stale."""
    fields = {"compiled": status.compiled, "modules": list(MODULES), "reason": status.reason}
    if status.stale:
        log.warning("compiled_modules", **fields)
    else:
        log.info("compiled_modules", **fields)


if TYPE_CHECKING:
    # What mypyc reads while compiling (it never calls the decorator); imported from here by
    # the compiled modules, which this module is not, so that at run time the stand-in
    # below is enough and mypy_extensions is no dependency.
    from mypy_extensions import mypyc_attr
else:

    def mypyc_attr(*flags: str, **options: object) -> Callable[[_C], _C]:
        """``mypy_extensions.mypyc_attr`` at run time: leaves the class as it is."""
        return _unchanged


def _unchanged(cls: _C) -> _C:
    return cls
