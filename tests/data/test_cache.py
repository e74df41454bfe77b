"""The ground-truth cache is bounded by bytes: large images never pile up in memory."""

from __future__ import annotations

import numpy as np
import pytest

from alseg.data.cache import ArrayCache


def test_least_recently_used_arrays_leave_first() -> None:
    cache = ArrayCache(max_bytes=3000)
    loads: list[str] = []

    def loader(key: str) -> np.ndarray:
        def load() -> np.ndarray:
            loads.append(key)
            return np.zeros(1000, dtype=np.uint8)

        return load

    for key in "abc":
        cache.get(key, loader(key))
    cache.get("a", loader("a"))  # a is now the most recent
    cache.get("d", loader("d"))  # b leaves
    assert loads == ["a", "b", "c", "d"]
    assert "b" not in cache and all(k in cache for k in "acd")
    assert cache.nbytes == 3000 <= cache.max_bytes


def test_an_array_larger_than_the_budget_is_not_kept() -> None:
    cache = ArrayCache(max_bytes=100)
    small = cache.get("s", lambda: np.zeros(50, dtype=np.uint8))
    big = cache.get("b", lambda: np.zeros(1000, dtype=np.uint8))
    assert big.nbytes == 1000 and "b" not in cache and "s" in cache
    assert small.nbytes == 50


def test_a_negative_budget_is_refused() -> None:
    with pytest.raises(ValueError, match="max_bytes"):
        ArrayCache(-1)
