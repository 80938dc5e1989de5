"""``examples/token_refresh.py`` finds the development broker's secret by itself, or says where
it is: run from where ``make run`` wrote ``.pubsub-dev/broker.toml``, it needs no variable."""

from __future__ import annotations

import os
from pathlib import Path

from tests.sdk.test_cli import broker
from tests.sdk.test_examples import example
from tests.support.broker import BrokerProcess

__all__ = ["broker"]


def without_secret(b: BrokerProcess) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PUBSUB_BROKER_JWT_SECRET"}
    return {**env, "PYTHONPATH": str(Path(__file__).resolve().parents[2]), "PUBSUB_URL": b.url}


def test_it_reads_the_secret_from_the_development_configuration(
    broker: BrokerProcess, tmp_path: Path
) -> None:
    (tmp_path / ".pubsub-dev").mkdir()
    (tmp_path / ".pubsub-dev" / "broker.toml").write_text(
        f'[server]\nworkers = 1\n\n[auth]\njwt_secret = "{broker.secret}"\n'
    )
    done = example("token_refresh.py", ["3"], without_secret(broker), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "minting a new 5 s token" in done.stdout and "reconnects: 0" in done.stdout


def test_without_a_secret_it_says_where_to_find_one(broker: BrokerProcess, tmp_path: Path) -> None:
    done = example("token_refresh.py", ["3"], without_secret(broker), cwd=tmp_path)
    assert done.returncode == 1
    assert "PUBSUB_BROKER_JWT_SECRET is not set" in done.stderr
    assert str(tmp_path / ".pubsub-dev" / "broker.toml") in done.stderr
    assert "Traceback" not in done.stderr and "minting" not in done.stdout
