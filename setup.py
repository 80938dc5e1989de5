"""Optional build step: the broker's hot modules compiled with mypyc.

Everything else about the package is declared in pyproject.toml. With ``TRIO_PUBSUB_COMPILE=1``
the modules named in broker/native.py are compiled to C extensions (``make compile`` does it in
place in a checkout; ``TRIO_PUBSUB_COMPILE=1 pip install --no-build-isolation .`` into an
environment that has mypy and the broker's dependencies, which mypyc type-checks against).
Without it, or when anything about compiling fails (no mypy, no C compiler, a type error),
the package is pure Python, as always, and one line says why: an install never fails for
want of a compiler. The build records what it compiled (broker/native.json), so that the
package runs its extensions only while they match their sources.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

from setuptools import setup
from setuptools.command.build_ext import build_ext

HERE = Path(__file__).resolve().parent
# Loaded on its own: importing the package would run its import-time checks.
_spec = importlib.util.spec_from_file_location("_broker_native", HERE / "broker" / "native.py")
assert _spec is not None and _spec.loader is not None
native = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(native)


def _say(message: str) -> None:
    print(f"trio-pubsub: {message}", file=sys.stderr)


class BuildNative(build_ext):
    """build_ext that writes the manifest after the extensions, and falls back to pure
    Python (no extensions, no manifest) when compiling them fails."""

    digests: dict[str, str] = {}

    def run(self) -> None:
        if not self.extensions:
            # Not asked to compile: an in-place build of earlier stays as it is (its manifest
            # still keeps it from running stale code).
            return
        target = HERE / "broker" if self.inplace else Path(self.build_lib) / "broker"
        # Gone until every extension is built: a build that fails halfway is not used.
        (target / native.MANIFEST).unlink(missing_ok=True)
        try:
            super().run()
        except Exception as exc:  # the compiler's and the linker's errors, OSError
            _say(f"compiling the hot modules failed ({exc}); installing pure Python")
            self.extensions = []
            return
        target.mkdir(parents=True, exist_ok=True)
        (target / native.MANIFEST).write_text(native.manifest_text(self.digests))
        _say("the hot modules are compiled (broker/native.py says when they are used)")


def extensions() -> list[Any]:
    """The mypyc extensions when asked for and possible, else none."""
    if os.environ.get("TRIO_PUBSUB_COMPILE", "") not in ("1", "true", "yes"):
        return []
    try:
        from mypyc.build import mypycify
    except ImportError:
        _say("TRIO_PUBSUB_COMPILE is set but mypy is not installed; installing pure Python")
        return []
    # Read before mypyc reads the sources, so that an edit during the build shows as stale.
    BuildNative.digests = native.source_digests(HERE / "broker")
    paths = [f"broker/{name}.py" for name in native.MODULES]
    try:
        return list(mypycify(paths, group_name=f"broker.{native.GROUP}"))
    except (Exception, SystemExit) as exc:  # mypy's errors end in SystemExit
        _say(f"mypyc refused the hot modules ({exc!r}); installing pure Python")
        return []


setup(ext_modules=extensions(), cmdclass={"build_ext": BuildNative})
