"""The q/k rope permutation llama.cpp's converter applies (pure array maths)."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from agent.model.export import permute_rope, unpermute_rope


def test_pairs_rotate_half_rows_next_to_each_other() -> None:
    head_dim = 8
    rows = np.arange(2 * head_dim, dtype=np.float32)[:, None]  # two heads, one column
    permuted = permute_rope(rows, n_head=2)[:, 0].astype(int).tolist()
    # Per head: rotate-half pairs (i, i + d/2) become adjacent rows (2i, 2i + 1).
    assert permuted == [0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15]


@given(
    n_head=st.integers(min_value=1, max_value=4),
    half=st.integers(min_value=1, max_value=8),
    cols=st.integers(min_value=1, max_value=5),
    seed=st.integers(min_value=0, max_value=2**32 - 1),
)
def test_unpermute_inverts_permute(n_head: int, half: int, cols: int, seed: int) -> None:
    weights = np.random.default_rng(seed).standard_normal((n_head * 2 * half, cols)).astype(np.float32)
    permuted = permute_rope(weights, n_head=n_head)
    assert permuted.shape == weights.shape
    assert np.array_equal(unpermute_rope(permuted, n_head=n_head), weights)
