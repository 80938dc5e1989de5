"""Mutation testing: plant small bugs in the core modules and see whether the fast tests notice.

    python -m bench.mutate [--sample 0.06] [--budget 840] [--seed 20] [--modules a.py,b.py]

Runs mutmut (the ``mutate`` extra; ``make mutate`` installs it) over the modules listed in
``[tool.mutmut]`` of pyproject.toml against the fast tests named there (the unit tests and the
SDK's protocol and reconnect tests, which need no broker process), at the lowest CPU priority.

Theory of operation: a full run is a few thousand mutants, too long for a habit, so a run is
bounded twice. First mutmut generates every mutant and records which tests cover which
function (one pass of the tests, failing on purpose at the end: no mutant is named yet).
Then a seeded random ``--sample`` of the mutants of each module is run, under a wall-clock
``--budget``; whatever is left unchecked when the budget ends is reported as such, never as
killed. The score, per module, is the share of the judged mutants (checked, and covered by
some test) that the tests noticed: failed, or hung until mutmut's timeout.

Writes ``bench/results/mutate-latest.md``: the score per module and every survivor with the
line mutmut changed, so that each one can be killed by a test or explained (docs/testing.md
explains the ones looked at). mutmut's own state stays in ``mutants/`` (not committed).
"""

from __future__ import annotations

import argparse
import datetime
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
LINE = re.compile(r"^\s+(?P<name>\S+): (?P<status>.+)$")
SHOWN_SURVIVORS = 150  # per report; the rest are counted


def mutmut() -> list[str]:
    """The mutmut command of this interpreter's environment, at the lowest priority."""
    exe = shutil.which("mutmut", path=str(Path(sys.executable).parent))
    if exe is None:
        raise SystemExit("mutmut is not installed: pip install -e '.[mutate]' (make mutate)")
    return ["nice", "-n", "19", exe]


def configured_modules() -> list[str]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mutmut"]
    return list(config["only_mutate"])


def module_of(mutant: str) -> str:
    """``broker.topics.x_validate__mutmut_3`` -> ``broker/topics.py``."""
    dotted = mutant.split(".x", 1)[0] if ".x" in mutant else mutant.rsplit(".", 1)[0]
    return dotted.replace(".", "/") + ".py"


def results() -> dict[str, str]:
    """Every mutant mutmut knows, with its status."""
    out = subprocess.run(
        [*mutmut(), "results", "--all", "true"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return {m["name"]: m["status"] for m in map(LINE.match, out.splitlines()) if m}


def changed_line(mutant: str) -> str:
    """The source line as the mutant has it (the first added line of ``mutmut show``)."""
    out = subprocess.run(
        [*mutmut(), "show", mutant], cwd=ROOT, capture_output=True, text=True, check=False
    ).stdout
    before = after = ""
    for line in out.splitlines():
        if line.startswith("-") and not line.startswith("---") and not before:
            before = line[1:].strip()
        elif line.startswith("+") and not line.startswith("+++") and not after:
            after = line[1:].strip()
    return f"`{before}` -> `{after}`" if before or after else "(no diff)"


def generate() -> None:
    """Make every mutant and the test-coverage statistics; no mutant is run."""
    proc = subprocess.run(
        [*mutmut(), "run", "--max-children", "1", "nothing-by-this-name"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    if not any((ROOT / "mutants").rglob("*.py.meta")):
        sys.stdout.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit("mutmut did not generate mutants")


def run_bounded(command: list[str], budget: float) -> None:
    """Run ``command`` for at most ``budget`` seconds; then stop it and every process it
    forked (mutmut runs each mutant in a child of its own)."""
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, start_new_session=True)
    try:
        proc.wait(budget)
    except subprocess.TimeoutExpired:
        print("budget spent: the rest stays unchecked", flush=True)
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def sample(names: list[str], modules: list[str], fraction: float, seed: int) -> list[str]:
    rng = random.Random(seed)
    chosen: list[str] = []
    for module in modules:
        of_module = sorted(n for n in names if module_of(n) == module)
        k = max(1, round(len(of_module) * fraction)) if of_module else 0
        chosen += rng.sample(of_module, k)
    return chosen


def report(
    statuses: dict[str, str],
    chosen: list[str],
    modules: list[str],
    args: argparse.Namespace,
    elapsed: float,
) -> str:
    per_module: dict[str, Counter[str]] = defaultdict(Counter)
    generated: Counter[str] = Counter(module_of(n) for n in statuses)
    for name in chosen:
        per_module[module_of(name)][statuses.get(name, "not checked")] += 1
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    lines = [
        "# Mutation testing: latest run",
        "",
        f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, commit {commit or '?'}, "
        f"mutmut, sample {args.sample:.0%} (seed {args.seed}), budget {args.budget:.0f} s, "
        f"took {elapsed:.0f} s. Score = (killed + timeout) / judged (checked and covered by a "
        "test). `make mutate` to rerun; "
        "docs/testing.md explains the survivors.",
        "",
        "| module | mutants | sampled | killed | survived | timeout | no tests | not checked "
        "| score |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    total: Counter[str] = Counter()
    for module in modules:
        c = per_module[module]
        total.update(c)
        lines.append(_row(module, generated[module], c))
    lines.append(_row("**all**", sum(generated[m] for m in modules), total))
    survivors = sorted(n for n in chosen if statuses.get(n) == "survived")
    lines += ["", f"## Survivors ({len(survivors)})", ""]
    for name in survivors[:SHOWN_SURVIVORS]:
        lines.append(f"- `{name}`: {changed_line(name)}")
    if len(survivors) > SHOWN_SURVIVORS:
        lines.append(f"- ... and {len(survivors) - SHOWN_SURVIVORS} more (`mutmut results`)")
    return "\n".join(lines) + "\n"


def _row(module: str, generated: int, c: Counter[str]) -> str:
    sampled = sum(c.values())
    killed = c["killed"]
    timeout = c["timeout"]
    judged = killed + c["survived"] + timeout + c["suspicious"] + c["segfault"]
    # A mutant that hangs the tests (timeout) was noticed: it counts as killed.
    score = f"{(killed + timeout) / judged:.0%}" if judged else "-"
    return (
        f"| {module} | {generated} | {sampled} | {killed} | {c['survived']} | {timeout} "
        f"| {c['no tests']} | {c['not checked']} | {score} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sample", type=float, default=0.06, help="fraction of each module")
    parser.add_argument("--budget", type=float, default=840.0, help="seconds for the mutants")
    parser.add_argument("--seed", type=int, default=20)
    parser.add_argument("--modules", help="comma-separated subset of [tool.mutmut] only_mutate")
    args = parser.parse_args()
    modules = configured_modules()
    if args.modules:
        wanted = args.modules.split(",")
        unknown = set(wanted) - set(modules)
        if unknown:
            raise SystemExit(f"not in [tool.mutmut] only_mutate: {sorted(unknown)}")
        modules = wanted
    start = time.monotonic()
    generate()
    chosen = sample(sorted(results()), modules, args.sample, args.seed)
    print(f"running {len(chosen)} mutants, at most {args.budget:.0f} s", flush=True)
    run_bounded([*mutmut(), "run", "--max-children", "1", *chosen], args.budget)
    text = report(results(), chosen, modules, args, time.monotonic() - start)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "mutate-latest.md").write_text(text)
    print(text.split("\n## ")[0])


if __name__ == "__main__":
    main()
