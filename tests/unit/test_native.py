"""The choice between the compiled hot modules and their sources (broker/native.py): the
extensions are used only all together and while they match their sources, an edited source
is what runs, and TRIO_PUBSUB_COMPILED=1 cannot pass on pure Python. Extensions here are
stand-in files (or garbage that would fail to load), so no compiler is needed."""

from __future__ import annotations

import importlib
import importlib.machinery
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from broker import native

SUFFIX = importlib.machinery.EXTENSION_SUFFIXES[0]
MODULES = ("fast", "faster")


def make_package(root: Path, name: str, *, built: bool = True, manifest: bool = True) -> Path:
    """A package ``name`` with MODULES as sources and, with ``built``, stand-in extensions
    (garbage: importing one fails) and a manifest that matches the sources."""
    pkg = root / name
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    for module in MODULES:
        (pkg / f"{module}.py").write_text(f"WHICH = 'source of {module}'\n")
        if built:
            (pkg / f"{module}{SUFFIX}").write_bytes(b"not an ELF file")
    if built:
        (pkg / f"{native.GROUP}__mypyc{SUFFIX}").write_bytes(b"not an ELF file")
    if manifest:
        (pkg / native.MANIFEST).write_text(
            native.manifest_text(native.source_digests(pkg, MODULES))
        )
    return pkg


@pytest.fixture
def importable(tmp_path: Path) -> Iterator[Path]:
    """``tmp_path`` on sys.path; the finders and modules a test adds are taken away again."""
    finders, status = list(sys.meta_path), native.status
    sys.path.insert(0, str(tmp_path))
    try:
        yield tmp_path
    finally:
        sys.path.remove(str(tmp_path))
        sys.meta_path[:] = finders
        native.status = status
        for name in [n for n in sys.modules if n.startswith("pkg_")]:
            del sys.modules[name]
        importlib.invalidate_caches()


def test_extensions_matching_their_sources_are_used(tmp_path: Path) -> None:
    pkg = make_package(tmp_path, "pkg")
    assert native.check(pkg, MODULES) == native.Status(True, "")


def test_without_extensions_it_is_pure_python_and_nothing_is_wrong(tmp_path: Path) -> None:
    status = native.check(make_package(tmp_path, "pkg", built=False, manifest=False), MODULES)
    assert not status.compiled and not status.stale
    assert "not compiled" in status.reason


def test_an_edited_source_makes_every_extension_stale_and_names_the_file(tmp_path: Path) -> None:
    pkg = make_package(tmp_path, "pkg")
    with (pkg / "faster.py").open("a") as f:
        f.write("# edited\n")
    status = native.check(pkg, MODULES)
    assert status.stale and not status.compiled
    assert status.reason.startswith("faster.py changed since compiled")


@pytest.mark.parametrize("missing", ["fast", f"{native.GROUP}__mypyc"])
def test_a_missing_extension_makes_the_rest_unusable(tmp_path: Path, missing: str) -> None:
    pkg = make_package(tmp_path, "pkg")
    (pkg / f"{missing}{SUFFIX}").unlink()
    status = native.check(pkg, MODULES)
    assert status.stale and not status.compiled and missing in status.reason


@pytest.mark.parametrize(
    "manifest",
    [None, "{not json", json.dumps({"sources": {}}), json.dumps([1])],
    ids=["missing", "garbage", "no-tag", "not-an-object"],
)
def test_without_a_readable_manifest_the_extensions_are_not_used(
    tmp_path: Path, manifest: str | None
) -> None:
    pkg = make_package(tmp_path, "pkg", manifest=False)
    if manifest is not None:
        (pkg / native.MANIFEST).write_text(manifest)
    status = native.check(pkg, MODULES)
    assert status.stale and not status.compiled and native.MANIFEST in status.reason


def test_extensions_built_for_another_interpreter_are_not_used(tmp_path: Path) -> None:
    pkg = make_package(tmp_path, "pkg")
    recorded = json.loads((pkg / native.MANIFEST).read_text())
    (pkg / native.MANIFEST).write_text(json.dumps({**recorded, "cache_tag": "cpython-27"}))
    status = native.check(pkg, MODULES)
    assert status.stale and "cpython-27" in status.reason


def test_stale_extensions_are_passed_over_for_the_sources(importable: Path) -> None:
    pkg = make_package(importable, "pkg_stale")
    (pkg / "fast.py").write_text("WHICH = 'the edited source'\n")
    status = native.select("pkg_stale", pkg, MODULES, setting="auto")
    assert status.stale
    fast = importlib.import_module("pkg_stale.fast")
    faster = importlib.import_module("pkg_stale.faster")
    assert fast.WHICH == "the edited source"
    assert faster.WHICH == "source of faster"  # unchanged, but never mixed with compiled
    assert native.status is status


def test_without_the_choice_the_stand_in_extension_would_be_imported(importable: Path) -> None:
    """The control of the test above: Python prefers the extension beside a source."""
    make_package(importable, "pkg_control")
    with pytest.raises(ImportError):
        importlib.import_module("pkg_control.fast")


def test_compiled_off_passes_over_current_extensions(importable: Path) -> None:
    pkg = make_package(importable, "pkg_off")
    status = native.select("pkg_off", pkg, MODULES, setting="0")
    assert status == native.Status(False, f"{native.ENV}=0")
    assert importlib.import_module("pkg_off.fast").WHICH == "source of fast"


def test_compiled_required_refuses_loudly_rather_than_run_the_sources(importable: Path) -> None:
    pkg = make_package(importable, "pkg_required")
    (pkg / "fast.py").write_text("WHICH = 'the edited source'\n")
    with pytest.raises(ImportError, match=r"TRIO_PUBSUB_COMPILED=1.*fast\.py changed"):
        native.select("pkg_required", pkg, MODULES, setting="1")
    with pytest.raises(ImportError, match="not compiled"):
        native.select("pkg_required", tmp_sources_only(importable), MODULES, setting="1")


def tmp_sources_only(root: Path) -> Path:
    return make_package(root, "pkg_sources_only", built=False, manifest=False)


def test_an_unknown_setting_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ImportError, match="TRIO_PUBSUB_COMPILED must be one of auto, 0, 1"):
        native.select("pkg", make_package(tmp_path, "pkg"), MODULES, setting="yes")


def test_this_process_runs_what_its_status_says() -> None:
    """Every hot module of the broker is compiled, or none is, as ``native.status`` says."""
    modules = [importlib.import_module(f"broker.{name}") for name in native.MODULES]
    loaders = {type(m.__spec__.loader) for m in modules if m.__spec__ is not None}
    compiled = loaders == {importlib.machinery.ExtensionFileLoader}
    assert compiled is native.status.compiled, (loaders, native.status)
    if not compiled:
        assert loaders == {importlib.machinery.SourceFileLoader}, loaders


class Log:
    def __init__(self) -> None:
        self.lines: list[tuple[str, str, dict[str, Any]]] = []

    def info(self, event: str, **fields: Any) -> None:
        self.lines.append(("info", event, fields))

    def warning(self, event: str, **fields: Any) -> None:
        self.lines.append(("warning", event, fields))


@pytest.mark.parametrize(
    ("status", "level"),
    [
        (native.Status(True, ""), "info"),
        (native.Status(False, "not compiled"), "info"),
        (native.Status(False, "fast.py changed since compiled", True), "warning"),
    ],
)
def test_the_status_is_logged_once_and_stale_extensions_as_a_warning(
    monkeypatch: pytest.MonkeyPatch, status: native.Status, level: str
) -> None:
    monkeypatch.setattr(native, "status", status)
    log = Log()
    native.log_status(log)
    [(logged_level, event, fields)] = log.lines
    assert (logged_level, event) == (level, "compiled_modules")
    assert fields["compiled"] is status.compiled and fields["reason"] == status.reason
