"""FLQMI speed and memory: alseg.selection versus submodlib's FacilityLocationVariantMutualInformationFunction.

Stochastic greedy (ε = 0.01, η = 1), budget 100, 64-dimensional standard-normal embeddings, the query set a random
5% of the pool (1% at 1M), rescaled cosine similarity. Each measurement runs in a fresh subprocess that reports
its own wall time and peak RSS (``ru_maxrss``, data generation and interpreter included) and runs under an
address-space limit (RLIMIT_AS, at most 20 GB and at most the available memory minus 4 GB) and a timeout, so a
failing run is recorded instead of taking the machine down. Submodlib gets the same numpy-built similarity
matrix through ``query_sijs`` (its fast path; the time of building that matrix counts for it too).
Targets: ≥ 5× faster than submodlib at 10k; 100k within 3 GB and 60 s; 1M completes. Takes ≤ 10 minutes.

    python benchmarks/flqmi.py [--sizes 10000 100000 1000000] [--timeout 300] [--no-submodlib-100k]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

DIM, BUDGET, EPSILON, ETA = 64, 100, 0.01, 1.0
GB = 1024**3


def query_count(n: int) -> int:
    return n // 100 if n >= 1_000_000 else n // 20


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB  # ru_maxrss is in KiB on Linux


def available_gb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024 / GB
    return 24.0


# --------------------------------------------------------------------------- child: one measurement
def child(impl: str, n: int, q: int, seed: int, repeats: int, mem_limit_gb: float) -> dict[str, Any]:
    limit = int(mem_limit_gb * GB)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    import numpy as np

    from alseg.selection.flqmi import MAX_DENSE_BYTES, cosine_kernel, flqmi_maximize, flqmi_value

    rng = np.random.default_rng(seed)
    pool = rng.standard_normal((n, DIM), dtype=np.float32)
    query = pool[np.sort(rng.choice(n, q, replace=False))]
    out: dict[str, Any] = {"impl": impl, "n": n, "q": q, "rss_after_data_gb": round(peak_rss_gb(), 3)}
    times: list[dict[str, float]] = []
    for r in range(repeats):
        if impl == "ours":
            t0 = time.perf_counter()
            kernel = cosine_kernel(pool, query)  # exactly what flqmi_select does
            dense = n * q * 4 <= MAX_DENSE_BYTES
            src = kernel.dense() if dense else kernel
            t1 = time.perf_counter()
            stats: dict[str, int] = {}
            res = flqmi_maximize(src, BUDGET, eta=ETA, epsilon=EPSILON, rng=np.random.default_rng(r), stats=stats)
            t2 = time.perf_counter()
            times.append({"similarity": t1 - t0, "maximize": t2 - t1})
            out.update(
                similarity="dense" if dense else "on demand",
                rows_evaluated=stats["rows_evaluated"],
                value=round(res.value, 4),
            )
            del src, kernel
        else:
            from submodlib import FacilityLocationVariantMutualInformationFunction

            t0 = time.perf_counter()
            kernel = cosine_kernel(pool, query)
            S = kernel.dense()
            t1 = time.perf_counter()
            fn = FacilityLocationVariantMutualInformationFunction(
                n=n, num_queries=q, query_sijs=S, queryDiversityEta=ETA
            )
            t2 = time.perf_counter()
            picked = fn.maximize(
                budget=BUDGET,
                optimizer="StochasticGreedy",
                epsilon=EPSILON,
                stopIfZeroGain=False,
                stopIfNegativeGain=False,
                show_progress=False,
            )
            t3 = time.perf_counter()
            times.append({"similarity": t1 - t0, "constructor": t2 - t1, "maximize": t3 - t2})
            out["value"] = round(flqmi_value(kernel, [int(i) for i, _ in picked], eta=ETA), 4)
            del fn, S
    best = min(times, key=lambda t: sum(t.values()))
    out.update({f"seconds_{k}": round(v, 4) for k, v in best.items()})
    out["seconds"] = round(sum(best.values()), 4)
    out["repeats"] = repeats
    out["peak_gb"] = round(peak_rss_gb(), 3)
    return out


def measure(impl: str, n: int, seed: int, repeats: int, timeout: float, mem_limit_gb: float) -> dict[str, Any]:
    q = query_count(n)
    cmd = [
        sys.executable,
        __file__,
        "--child",
        impl,
        "--n",
        str(n),
        "--seed",
        str(seed),
        "--repeats",
        str(repeats),
        "--mem-limit-gb",
        f"{mem_limit_gb:.2f}",
    ]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {
            "impl": impl,
            "n": n,
            "q": q,
            "status": f"timeout after {timeout:.0f} s",
            "seconds_until_failure": round(time.perf_counter() - t0, 1),
            "mem_limit_gb": mem_limit_gb,
        }
    wall = round(time.perf_counter() - t0, 2)
    lines = [ln for ln in proc.stdout.strip().splitlines() if ln.startswith("{")]
    if proc.returncode == 0 and lines:
        return {**json.loads(lines[-1]), "status": "ok", "process_wall_seconds": wall}
    err = (proc.stderr.strip().splitlines() or ["(no stderr)"])[-1]
    how = f"killed by signal {-proc.returncode}" if proc.returncode < 0 else f"exit code {proc.returncode}"
    return {
        "impl": impl,
        "n": n,
        "q": q,
        "status": f"failed ({how}): {err[:300]}",
        "seconds_until_failure": wall,
        "mem_limit_gb": mem_limit_gb,
    }


# --------------------------------------------------------------------------- parent
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per measurement")
    p.add_argument("--no-submodlib-100k", action="store_true", help="skip submodlib above 10k")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--child", choices=["ours", "submodlib"], help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, help=argparse.SUPPRESS)
    p.add_argument("--repeats", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--mem-limit-gb", type=float, default=20.0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.n, query_count(args.n), args.seed, args.repeats, args.mem_limit_gb)))
        return

    from _common import save_result

    mem_limit_gb = round(max(2.0, min(20.0, available_gb() - 4.0)), 2)
    load_start = os.getloadavg()
    runs: list[dict[str, Any]] = []
    for n in args.sizes:
        repeats = 5 if n <= 10_000 else 1
        impls = ["ours", "submodlib"] if (n <= 10_000 or not args.no_submodlib_100k) and n < 1_000_000 else ["ours"]
        for impl in impls:
            r = measure(impl, n, args.seed, repeats, args.timeout, mem_limit_gb)
            print(json.dumps(r), file=sys.stderr, flush=True)
            runs.append(r)

    def get(impl: str, n: int) -> dict[str, Any]:
        return next((r for r in runs if r["impl"] == impl and r["n"] == n), {})

    ours10, sub10, ours100, ours1m = (
        get("ours", 10_000),
        get("submodlib", 10_000),
        get("ours", 100_000),
        get("ours", 1_000_000),
    )
    data: dict[str, Any] = {
        "setup": {
            "dim": DIM,
            "budget": BUDGET,
            "epsilon": EPSILON,
            "eta": ETA,
            "optimizer": "stochastic greedy",
            "query_fraction": "5% (1% at 1M)",
            "similarity": "(cos + 1) / 2",
            "mem_limit_gb": mem_limit_gb,
        },
        "speedup_10k": round(sub10["seconds"] / ours10["seconds"], 2)
        if "seconds" in sub10 and "seconds" in ours10
        else None,
        "seconds_10k": ours10.get("seconds"),
        "submodlib_seconds_10k": sub10.get("seconds"),
        "peak_gb_10k": ours10.get("peak_gb"),
        "submodlib_peak_gb_10k": sub10.get("peak_gb"),
        "value_ratio_10k": round(ours10["value"] / sub10["value"], 4)
        if "value" in sub10 and "value" in ours10
        else None,
        "seconds_100k": ours100.get("seconds"),
        "peak_gb_100k": ours100.get("peak_gb"),
        "submodlib_100k": get("submodlib", 100_000).get("status", "not run"),
        "seconds_1m": ours1m.get("seconds"),
        "peak_gb_1m": ours1m.get("peak_gb"),
        "runs": runs,
        "load_average_start": [round(x, 2) for x in load_start],
        "load_average_end": [round(x, 2) for x in os.getloadavg()],
        "note": "2 shared cores; other jobs (nnU-Net training) may have run concurrently, see load averages",
    }
    data["targets_met"] = {
        "speedup_10k_at_least_5": bool(data["speedup_10k"] and data["speedup_10k"] >= 5),
        "100k_within_3gb": bool(data["peak_gb_100k"] is not None and data["peak_gb_100k"] <= 3.0),
        "100k_within_60s": bool(data["seconds_100k"] is not None and data["seconds_100k"] <= 60.0),
        "1m_completes": ours1m.get("status") == "ok",
    }
    save_result("flqmi", data)


if __name__ == "__main__":
    main()
