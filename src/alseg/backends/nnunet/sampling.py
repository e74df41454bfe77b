"""K Monte Carlo dropout samples of one case in batched forward passes.

nnU-Net's predictor runs one network call per sliding-window tile (batch 1) and, called K times for K dropout
passes, preprocesses the case K times, rebuilds the tile list K times and accumulates in half precision. Here the
case is preprocessed once and the (tile, pass) pairs run through the network in batches: every batch element
draws its own dropout masks, so each pass is still an independent sample of the same network (the method is
unchanged: the same K passes at the same dropout rate), and each pass's logits are put together exactly as
nnU-Net does (padding to the patch, the Gaussian tile weights, the same tile positions), in float32, then mapped
back to the image with nnU-Net's own export function. On Hippocampus 2D slices this cut a case's ten passes from
2.6 s to 1.4 s on 2 cores (``benchmarks/results/mc_dropout_batching.json``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

#: elements (tiles x passes) per network call: about 2**19 input voxels per call, between 1 and 128
BATCH_VOXELS = 2**19
MAX_BATCH = 128


def batch_size_for(patch_size: tuple[int, ...]) -> int:
    """How many (tile, pass) elements go into one network call for this patch size."""
    return int(max(1, min(MAX_BATCH, BATCH_VOXELS // int(np.prod(patch_size)))))


def preprocess(predictor: Any, image: np.ndarray, props: dict) -> tuple[Any, dict]:
    """nnU-Net's preprocessing of one in-memory case (crop, normalise, resample): ``(data, properties)``."""
    from nnunetv2.inference.data_iterators import PreprocessAdapterFromNpy

    ppa = PreprocessAdapterFromNpy(
        [image],
        [None],
        [props],
        [None],
        predictor.plans_manager,
        predictor.dataset_json,
        predictor.configuration_manager,
        num_threads_in_multithreaded=1,
        verbose=False,
    )
    dct = next(ppa)
    return dct["data"], dct["data_properties"]


def sliding_window_logits(predictor: Any, data: Any, k: int, batch: int | None = None) -> Any:
    """``(k, heads, *spatial)`` float32 logits of ``k`` forward passes over preprocessed ``data``.

    The tiles and their Gaussian weights are nnU-Net's (``_internal_get_sliding_window_slicers``,
    ``compute_gaussian``, ``pad_nd_image``); ``(tile, pass)`` pairs are batched ``batch`` at a time. With
    dropout off (or p = 0) every pass equals nnU-Net's own ``predict_sliding_window_return_logits``.
    """
    import torch
    from acvl_utils.cropping_and_padding.padding import pad_nd_image
    from nnunetv2.inference.sliding_window_prediction import compute_gaussian

    patch = tuple(int(p) for p in predictor.configuration_manager.patch_size)
    batch = batch or batch_size_for(patch)
    device = predictor.device
    network = predictor.network.to(device)
    network.eval()  # MC dropout's forward pre-hook switches the dropout layers back on
    padded, revert = pad_nd_image(data, patch, "constant", {"value": 0}, True, None)
    padded = padded.to(torch.float32)
    slicers = predictor._internal_get_sliding_window_slicers(padded.shape[1:])
    if predictor.use_gaussian:
        weight_tile = compute_gaussian(patch, sigma_scale=1.0 / 8, value_scaling_factor=10, device=torch.device("cpu"))
        weight_tile = weight_tile.to(torch.float32)
    else:
        weight_tile = torch.ones(patch, dtype=torch.float32)
    heads = predictor.label_manager.num_segmentation_heads
    logits = torch.zeros((k, heads, *padded.shape[1:]), dtype=torch.float32)
    weights = torch.zeros(padded.shape[1:], dtype=torch.float32)
    for sl in slicers:
        weights[sl[1:]] += weight_tile
    pairs = [(sl, i) for sl in slicers for i in range(k)]
    with torch.inference_mode():
        for start in range(0, len(pairs), batch):
            chunk = pairs[start : start + batch]
            x = torch.stack([padded[sl] for sl, _ in chunk]).to(device)
            out = network(x)
            if isinstance(out, (list, tuple)):  # deep supervision left on: the full-resolution output
                out = out[0]
            out = out.to("cpu", torch.float32)
            for (sl, i), y in zip(chunk, out, strict=True):
                logits[i][sl] += y * weight_tile
    logits /= weights
    return logits[(slice(None), slice(None), *revert[1:])]


def mc_dropout_probabilities(predictor: Any, image: np.ndarray, props: dict, k: int, seed: int) -> np.ndarray:
    """``(k, C, *image shape)`` float32 probabilities of ``k`` dropout passes over one case, seeded by ``seed``.

    The predictor's network must have its dropout layers kept on (``_enable_mc_dropout``).
    """
    import torch
    from nnunetv2.inference.export_prediction import convert_predicted_logits_to_segmentation_with_correct_shape

    data, properties = preprocess(predictor, image, props)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        logits = sliding_window_logits(predictor, data, k)
    threads = torch.get_num_threads()
    samples = []
    for i in range(k):
        _, probs = convert_predicted_logits_to_segmentation_with_correct_shape(
            logits[i],
            predictor.plans_manager,
            predictor.configuration_manager,
            predictor.label_manager,
            properties,
            return_probabilities=True,
            num_threads_torch=threads,
        )
        samples.append(np.asarray(probs, dtype=np.float32))
    return np.stack(samples)


def per_pass_probabilities(predictor: Any, image: np.ndarray, props: dict, k: int, seed: int) -> np.ndarray:
    """``(k, C, *image shape)``: nnU-Net's own ``predict_single_npy_array`` once per pass, pass ``i`` seeded with
    ``seed + i``: the path the batched passes replace, kept as their reference (tests, and
    ``benchmarks/mc_dropout_batching.py``)."""
    import torch

    samples = []
    for i in range(k):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + i)
            _, probs = predictor.predict_single_npy_array(image, props, None, None, True)
        samples.append(np.asarray(probs, dtype=np.float32))
    return np.stack(samples)
