"""Read the broker's Prometheus metrics from outside, as an operator's scraper would."""

from __future__ import annotations

import urllib.request

from tests.support.broker import BrokerProcess


def metric(b: BrokerProcess, family: str, **labels: str) -> float:
    """The sum, over every worker, of the samples of ``family`` that carry ``labels``."""
    with urllib.request.urlopen(f"{b.http_url}/metrics", timeout=10) as response:
        text = response.read().decode()
    wanted = [f'{k}="{v}"' for k, v in labels.items()]
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(family + "{") and all(w in line for w in wanted)
    )
