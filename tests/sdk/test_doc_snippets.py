"""Every Python snippet of README.md and docs/python-sdk.md runs as written against a real broker.

The snippets are what a newcomer copies first, so they are taken from the documents themselves
(every ```python block, in order) rather than kept in a copy that could drift. Each one has an
entry in ``EXPECTED``; a document with more or fewer blocks than entries fails, so a new snippet
cannot go untested.

Two kinds of snippets:

- a *program* (imports, ``TOKEN``, ``trio.run``...) runs in its own interpreter exactly as
  written, with ``TOKEN`` defined and the development broker's URL replaced by the test
  broker's; the test reads its output until the line it promises, and either lets it end
  (it must exit 0) or stops it when it is a loop that waits for more (``async for``);
- a *fragment* (statements about a connected ``client``) runs statement by statement inside a
  connected client, with the names it leaves undefined (its callbacks, ``url``, ``jobs``)
  given plain stand-ins. A statement that is an ``async for`` waits for events that may never
  come, so it may still be running after a moment; every other one must finish without error.
"""

from __future__ import annotations

import ast
import inspect
import json
import os
import queue
import re
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

import client_sdk
import client_sdk.sync
from tests.support.broker import PRESENCE_EVERYWHERE, BrokerProcess

ROOT = Path(__file__).resolve().parents[2]
DEV_URL = "ws://127.0.0.1:8765/ws"
SUB = "snippets"  # the client id of the snippets' token
BLOCK = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)


@attrs.frozen
class Program:
    """A whole program: ``expect`` (a regular expression) matches one line of its output.
    ``runs_on`` is true when it waits for more until stopped; ``stdin`` is written once the
    expected line came; ``check`` looks at the broker afterwards."""

    expect: str | None = None
    runs_on: bool = False
    stdin: str | None = None
    check: Callable[[BrokerProcess], None] | None = None


@attrs.frozen
class Fragment:
    """Statements about a connected ``client``: ``sync`` for the blocking client, else trio."""

    sync: bool = False


def _check_date_encoded(b: BrokerProcess) -> None:
    with client_sdk.sync.connect(b.url, token=b.token("checker")) as c:
        assert [m.data for m in c.history("orders").messages] == [{"due": "2026-01-02"}]


EXPECTED: dict[str, list[Program | Fragment]] = {
    "README.md": [
        Program(r"^Message\(topic='chat\.room1', offset=1, .*data=\{'text': 'hi'\}", runs_on=True),
        Program(r"^Message\(topic='chat\.room1', offset=1, .*data=\{'text': 'hi'\}"),
        Program(r"^hello$", stdin="\n"),
    ],
    "docs/python-sdk.md": [
        Program(rf"^chat\.room1 1 {SUB} \{{'text': 'hi'\}}$", runs_on=True),
        Program(r"^Message\(topic='chat\.room1', offset=1, .*data=\{'text': 'hi'\}", runs_on=True),
        Fragment(),  # callbacks
        Program(check=_check_date_encoded),  # dumps=
        Fragment(),  # connection state, history, presence
        Program(rf"^\('{SUB}',\)$"),  # the blocking client
        Fragment(sync=True),  # the blocking client with callbacks
    ],
}

CASES = [
    pytest.param(doc, i, expected, id=f"{doc}-{i + 1}")
    for doc, entries in EXPECTED.items()
    for i, expected in enumerate(entries)
]


def snippets(doc: str) -> list[str]:
    return BLOCK.findall((ROOT / doc).read_text(encoding="utf-8"))


@pytest.mark.parametrize("doc", list(EXPECTED))
def test_every_snippet_has_an_expectation(doc: str) -> None:
    assert len(snippets(doc)) == len(EXPECTED[doc]), f"{doc}: add the new snippet to EXPECTED"


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[BrokerProcess]:
    """Like the development broker: presence tracked and readable on every topic."""
    with BrokerProcess.start(tmp_path, PRESENCE_EVERYWHERE) as b:
        yield b


@pytest.mark.parametrize(("doc", "index", "expected"), CASES)
def test_snippet_runs_as_written(
    broker: BrokerProcess, tmp_path: Path, doc: str, index: int, expected: Program | Fragment
) -> None:
    code = snippets(doc)[index]
    assert DEV_URL in code or isinstance(expected, Fragment), "a program names the dev broker"
    if isinstance(expected, Program):
        run_program(broker, tmp_path, code.replace(DEV_URL, broker.url), expected)
    elif expected.sync:
        run_sync_fragment(broker, code)
    else:
        trio.run(run_trio_fragment, broker, code)


def run_program(b: BrokerProcess, tmp_path: Path, code: str, expected: Program) -> None:
    script = tmp_path / "snippet.py"
    # TOKEN is the one name a program leaves to the reader; one line before it, nothing else.
    script.write_text(f"TOKEN = {json.dumps(b.token(SUB))}\n{code}", encoding="utf-8")
    proc = subprocess.Popen(
        [sys.executable, "-u", str(script)],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdin is not None
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line.rstrip("\n"))
        lines.put(None)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    seen: list[str] = []
    try:
        if expected.expect is not None:
            while not any(re.search(expected.expect, line) for line in seen):
                try:
                    line = lines.get(timeout=20)
                except queue.Empty:
                    pytest.fail(f"no line matching {expected.expect!r} within 20 s: {seen}")
                assert line is not None, f"ended without {expected.expect!r}: {seen}"
                seen.append(line)
        if expected.stdin is not None:
            proc.stdin.write(expected.stdin)
            proc.stdin.flush()
        if expected.runs_on:
            assert proc.poll() is None, "a program that waits for more ended"
        else:
            proc.stdin.close()
            assert proc.wait(timeout=20) == 0, proc.stderr.read() if proc.stderr else ""
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
        reader.join(10)
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()
    if expected.check is not None:
        expected.check(b)


class Recorder:
    """A stand-in for a callback a fragment names but does not define."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def __call__(self, *args: Any) -> None:
        self.calls.append(args)


def stand_ins(b: BrokerProcess) -> dict[str, Any]:
    names: dict[str, Any] = {name: getattr(client_sdk, name) for name in client_sdk.__all__}
    names.update(client_sdk=client_sdk, url=b.url, TOKEN=b.token(SUB), jobs=[{"job": 1}])
    for callback in ("show", "resync", "update_list", "report", "callback"):
        names[callback] = Recorder()
    return names


def statements(code: str) -> list[tuple[ast.stmt, Any]]:
    flags = ast.PyCF_ALLOW_TOP_LEVEL_AWAIT
    tree = ast.parse(code)
    return [
        (stmt, compile(ast.Module([stmt], type_ignores=[]), "<snippet>", "exec", flags=flags))
        for stmt in tree.body
    ]


async def run_trio_fragment(b: BrokerProcess, code: str) -> None:
    names = stand_ins(b)
    async with client_sdk.connect(b.url, token=b.token(SUB)) as client:
        names["client"] = client
        for stmt, compiled in statements(code):
            result = eval(compiled, names)
            if inspect.iscoroutine(result):
                with trio.move_on_after(0.5) as waited:
                    await result
                assert not waited.cancelled_caught or isinstance(stmt, ast.AsyncFor), (
                    f"line {stmt.lineno} of the fragment did not finish"
                )


def run_sync_fragment(b: BrokerProcess, code: str) -> None:
    names = stand_ins(b)
    names["client_sdk"] = client_sdk  # with client_sdk.sync imported above
    for _, compiled in statements(code):
        eval(compiled, names)
