"""MC dropout prediction: nnU-Net's predictor called once per pass against alseg's batched passes (sampling.py).

On the round-0 model of an MC-dropout experiment (e.g. a run of the 2D study) and the first N pool cases: seconds
per case for K passes both ways, and two checks that the batching changes no result: with dropout at p = 0 the
two give the same probabilities (max absolute difference; nnU-Net accumulates tiles in half precision), and at the
query rate (p = 0.1) the mean over the K samples, the mean predictive entropy and the mean BALD agree up to the
sampling noise. Alone on the machine.

    python benchmarks/mc_dropout_batching.py RUN_DIR [--cases 10] [--k 10] [--round 0]
"""

from __future__ import annotations

import argparse
import sys
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import save_result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run", type=Path)
    p.add_argument("--cases", type=int, default=10)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--round", type=int, default=0)
    args = p.parse_args()

    import torch

    from alseg.backends.nnunet.backend import _enable_mc_dropout
    from alseg.backends.nnunet.sampling import mc_dropout_probabilities, per_pass_probabilities
    from alseg.config import load_config
    from alseg.loop.runner import Experiment
    from alseg.uncertainty.measures import bald, predictive_entropy

    cfg = load_config(args.run / "config.yaml")
    if cfg.uncertainty.source != "mc_dropout":
        raise SystemExit(f"{args.run}: uncertainty source is {cfg.uncertainty.source!r}; expected mc_dropout")
    exp = Experiment(args.run, cfg)
    try:
        backend = exp.backend
        predictor = backend._load_predictor(exp.model_dir(args.round))
        cases = list(exp.pool)[: args.cases]
        images = []
        for cid in cases:
            image, spacing = backend.read_image(cid)
            images.append(
                (cid, np.ascontiguousarray(image, dtype=np.float32), {"spacing": [float(s) for s in spacing]})
            )

        rows: list[dict[str, Any]] = []
        for p_drop in (0.0, backend.dropout_query_p):
            _enable_mc_dropout(predictor.network, p_drop)
            for cid, image, props in images:
                seed = zlib.crc32(cid.encode())
                t0 = time.perf_counter()
                old = per_pass_probabilities(predictor, image, props, args.k, seed)
                t1 = time.perf_counter()
                new = mc_dropout_probabilities(predictor, image, props, args.k, seed)
                t2 = time.perf_counter()
                row = {
                    "case": cid,
                    "p": p_drop,
                    "seconds_per_pass_calls": round(t1 - t0, 3),
                    "seconds_batched": round(t2 - t1, 3),
                    "max_abs_diff": float(np.max(np.abs(old - new))),
                    "mean_probs_mean_abs_diff": float(np.mean(np.abs(old.mean(0) - new.mean(0)))),
                    "mean_entropy": [float(predictive_entropy(old).mean()), float(predictive_entropy(new).mean())],
                    "mean_bald": [float(bald(old).mean()), float(bald(new).mean())],
                }
                rows.append(row)
                print(row, flush=True)
    finally:
        exp.state.close()
    query = [r for r in rows if r["p"] > 0]
    old_s = float(np.mean([r["seconds_per_pass_calls"] for r in query]))
    new_s = float(np.mean([r["seconds_batched"] for r in query]))
    save_result(
        "mc_dropout_batching",
        {
            "run": str(args.run),
            "configuration": cfg.configuration,
            "k": args.k,
            "cases": len(cases),
            "torch_threads": torch.get_num_threads(),
            "seconds_per_case_per_pass_calls": round(old_s, 3),
            "seconds_per_case_batched": round(new_s, 3),
            "speedup": round(old_s / new_s, 2),
            "max_abs_diff_at_p0": max(r["max_abs_diff"] for r in rows if r["p"] == 0),
            "rows": rows,
        },
    )


if __name__ == "__main__":
    main()
