"""A least-recently-used cache of arrays bounded by bytes, not by count (large images stay within memory)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable

import numpy as np

#: the ground-truth cache of a running experiment: about 1 GiB, whatever the size of one image
GROUND_TRUTH_CACHE_BYTES = 1 << 30


class ArrayCache:
    """``get(key, load)``: the cached array, or ``load()`` cached under the byte budget.

    The least recently used arrays are dropped until the new one fits; an array larger than the whole budget
    is returned without being cached.
    """

    def __init__(self, max_bytes: int = GROUND_TRUTH_CACHE_BYTES) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = int(max_bytes)
        self.nbytes = 0
        self._items: OrderedDict[Hashable, np.ndarray] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._items

    def get(self, key: Hashable, load: Callable[[], np.ndarray]) -> np.ndarray:
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key]
        array = load()
        size = int(array.nbytes)
        if size > self.max_bytes:
            return array
        while self._items and self.nbytes + size > self.max_bytes:
            _, old = self._items.popitem(last=False)
            self.nbytes -= int(old.nbytes)
        self._items[key] = array
        self.nbytes += size
        return array
