"""Box-mean scoring throughput: voxels of the voxel map per second, one core.

20^3 boxes at stride 1 on a Hippocampus-sized map (36 x 50 x 36) and on a 300 x 512 x 512 map, and at stride 8,
for alseg's separable cumulative-sum filter (``alseg.scoring.boxes.box_means``) and, as a reference, scipy's
``uniform_filter`` (stride 1, then subsampled). Target (issue 3): at least 100 M voxels/s per core at stride 1
on the large map. Threads are limited to one (threadpoolctl) and the best of ``--repeats`` runs is reported.

    python benchmarks/scoring.py [--repeats 3] [--no-scipy]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import save_result


def best_time(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    from scipy.ndimage import uniform_filter

    from alseg.scoring.boxes import box_means

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-scipy", action="store_true")
    args = p.parse_args()
    rng = np.random.default_rng(0)
    box = (20, 20, 20)
    results: dict[str, dict] = {}
    with threadpool_limits(1):
        for name, shape in (("hippocampus", (36, 50, 36)), ("large", (300, 512, 512))):
            vol = rng.random(shape, dtype=np.float32)
            for stride in (1, 8):
                repeats = args.repeats if name == "large" else 50
                t = best_time(lambda vol=vol, stride=stride: box_means(vol, box, stride), repeats)
                results[f"{name}_stride{stride}"] = {
                    "shape": list(shape),
                    "seconds": round(t, 5),
                    "mvox_per_s": round(vol.size / t / 1e6, 1),
                }
            if not args.no_scipy:
                t = best_time(
                    lambda vol=vol: uniform_filter(vol, size=box, mode="constant"), 1 if name == "large" else 20
                )
                results[f"{name}_scipy_uniform_filter"] = {
                    "seconds": round(t, 4),
                    "mvox_per_s": round(vol.size / t / 1e6, 1),
                }
            del vol
    save_result(
        "scoring",
        {
            "box": list(box),
            "threads": 1,
            "results": results,
            "mvox_per_s_stride1_large": results["large_stride1"]["mvox_per_s"],
            "mvox_per_s_stride8_large": results["large_stride8"]["mvox_per_s"],
            "target_100_mvox_per_s": results["large_stride1"]["mvox_per_s"] >= 100,
        },
    )


if __name__ == "__main__":
    main()
