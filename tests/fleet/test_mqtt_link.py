"""The shared MQTT link's pure parts: backoff with jitter (both services reconnect with it)."""

from __future__ import annotations

import random

from hypothesis import given
from hypothesis import strategies as st

from fleet.mqtt_link import backoff_delay


@given(st.integers(min_value=0, max_value=10_000), st.integers(min_value=0, max_value=2**32))
def test_backoff_is_bounded_and_jittered(attempt: int, seed: int) -> None:
    delay = backoff_delay(attempt, base_s=0.5, cap_s=30.0, rng=random.Random(seed))
    ceiling = min(30.0, 0.5 * 2 ** min(attempt, 30))
    assert ceiling / 2 <= delay <= ceiling


def test_backoff_grows_then_caps() -> None:
    rng = random.Random(1)
    delays = [backoff_delay(a, base_s=1.0, cap_s=8.0, rng=rng) for a in range(8)]
    assert delays[0] <= 1.0 and delays[3] >= 4.0 and max(delays) <= 8.0
    assert len({round(d, 6) for d in delays}) == len(delays)  # jitter: no two alike
