"""Which weights USIM embeds (review finding M3): USIMC the bottleneck's last convolution, USIMF the convolutions
of every decoder stage (ALUNET's ``layer_used='decoder'``), on a real, tiny nnU-Net ``PlainConvUNet``.

Expected parameter sets are read off the network's structure here (``decoder.stages[i].convs[j].conv``,
``encoder.stages[-1]``), gradients are checked against one plain backward per region, and the Fisher
expectation F = mean g² is computed here with numpy.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence

import numpy as np
import pytest
from test_conformance import make_context, make_pool

from alseg.data.regions import Box
from alseg.selection.usim import fisher_parameter_subset
from alseg.strategies.registry import get_strategy

torch = pytest.importorskip("torch")
pytest.importorskip("dynamic_network_architectures")

from dynamic_network_architectures.architectures.unet import PlainConvUNet  # noqa: E402

from alseg.backends.nnunet.backend import (  # noqa: E402
    gradient_parameters,
    network_region_gradients,
    parameter_ranges,
)

SHAPE = (24, 24, 24)  # make_pool's case shape; divisible by the network's total stride 4


def tiny_unet(seed: int = 0) -> torch.nn.Module:
    """3 stages (4, 8, 16 features), 2 convs per stage, with bias, instance norm and dropout, like nnU-Net's."""
    torch.manual_seed(seed)
    net = PlainConvUNet(
        input_channels=1,
        n_stages=3,
        features_per_stage=(4, 8, 16),
        conv_op=torch.nn.Conv3d,
        kernel_sizes=3,
        strides=(1, 2, 2),
        n_conv_per_stage=2,
        num_classes=3,
        n_conv_per_stage_decoder=2,
        conv_bias=True,
        norm_op=torch.nn.InstanceNorm3d,
        norm_op_kwargs={"eps": 1e-5, "affine": True},
        dropout_op=torch.nn.Dropout3d,
        dropout_op_kwargs={"p": 0.1},
        nonlin=torch.nn.LeakyReLU,
        nonlin_kwargs={"inplace": True},
    )
    return net.eval()


def names_of(net: torch.nn.Module) -> dict[int, str]:
    return {id(p): n for n, p in net.named_parameters()}


def expected_decoder(net: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """Weight and bias of each stage conv, stage by stage: the ALUNET 'decoder' collection."""
    names = names_of(net)
    out = []
    for stage in net.decoder.stages:
        for block in stage.convs:
            out += [(names[id(block.conv.weight)], block.conv.weight), (names[id(block.conv.bias)], block.conv.bias)]
    return out


def expected_bottleneck(net: torch.nn.Module) -> torch.nn.Parameter:
    stage = net.encoder.stages[-1]
    blocks = stage[-1] if isinstance(stage, torch.nn.Sequential) else stage
    return blocks.convs[-1].conv.weight


def stage_spans(net: torch.nn.Module) -> list[tuple[int, int]]:
    """Flat [start, stop) of each decoder stage in the concatenation, from the parameter sizes."""
    spans, start = [], 0
    for stage in net.decoder.stages:
        size = sum(b.conv.weight.numel() + b.conv.bias.numel() for b in stage.convs)
        spans.append((start, start + size))
        start += size
    return spans


def masks_and_input() -> tuple[torch.Tensor, torch.Tensor, list[Box]]:
    rng = np.random.default_rng(0)
    image = torch.as_tensor(rng.normal(size=(1, 1, *SHAPE)), dtype=torch.float32)
    boxes = [
        Box((0, 0, 0), (8, 8, 8)),
        Box((8, 16, 4), (8, 8, 8)),
        Box((16, 4, 16), (8, 8, 8)),
        Box((4, 4, 4), (16,) * 3),
    ]
    masks = torch.zeros((len(boxes), *SHAPE))
    for i, b in enumerate(boxes):
        masks[(i, *b.slices())] = 1.0
    return image, masks, boxes


# --------------------------------------------------------------------------- the parameter sets
def test_decoder_set_is_every_decoder_stage_conv_and_nothing_else() -> None:
    net = tiny_unet()
    got = gradient_parameters(net, "decoder")
    want = expected_decoder(net)
    assert [n for n, _ in got] == [n for n, _ in want]
    assert all(p is q for (_, p), (_, q) in zip(got, want, strict=True))
    stages = {n.split(".")[2] for n, _ in got}
    assert stages == {str(i) for i in range(len(net.decoder.stages))}
    assert not any(("transpconvs" in n) or ("seg_layers" in n) or n.startswith("encoder") for n, _ in got)
    ranges = parameter_ranges(got)
    assert ranges[0][1] == 0 and all(a[2] == b[1] for a, b in itertools.pairwise(ranges))
    assert ranges[-1][2] == sum(p.numel() for _, p in want)


def test_bottleneck_set_is_exactly_the_last_encoder_conv_weight() -> None:
    net = tiny_unet()
    [(name, param)] = gradient_parameters(net, "bottleneck")
    weight = expected_bottleneck(net)
    assert param is weight and name == names_of(net)[id(weight)]
    assert parameter_ranges([(name, param)]) == [(name, 0, weight.numel())]


def test_unknown_layers_is_an_error_naming_the_valid_ones() -> None:
    with pytest.raises(ValueError, match=r"'encoder'.*'bottleneck'.*'decoder'"):
        gradient_parameters(tiny_unet(), "encoder")


# --------------------------------------------------------------------------- the gradients
@pytest.mark.parametrize("layers", ["bottleneck", "decoder"])
def test_batched_region_gradients_equal_one_backward_per_region(layers: str) -> None:
    net = tiny_unet()
    image, masks, _ = masks_and_input()
    named = gradient_parameters(net, layers)
    params = [p for _, p in named]
    got = network_region_gradients(net, image, masks, params, max_batch=3)  # two batched chunks
    for i in range(len(masks)):
        net.zero_grad(set_to_none=True)
        logp = torch.log_softmax(net(image), dim=1)[0]
        ce = -logp.gather(0, logp.argmax(0, keepdim=True))[0]  # CE against the argmax pseudo-label
        (ce * masks[i]).sum().backward()
        want = torch.cat([p.grad.reshape(-1) for p in params]).numpy()
        np.testing.assert_allclose(got[i], want, rtol=1e-4, atol=1e-6)
    index = np.array([7, 0, got.shape[1] - 1, 3])
    np.testing.assert_array_equal(network_region_gradients(net, image, masks, params, index), got[:, index])


def test_fisher_draw_over_the_decoder_reaches_every_stage() -> None:
    net = tiny_unet()
    image, masks, _ = masks_and_input()
    params = [p for _, p in gradient_parameters(net, "decoder")]
    g = network_region_gradients(net, image, masks, params).astype(np.float64)
    fisher = (g**2).mean(axis=0)
    spans = stage_spans(net)
    assert spans[-1][1] == g.shape[1] > 1000
    drawn = fisher_parameter_subset(fisher, 1000, np.random.default_rng(0))
    assert drawn.size == 1000
    for start, stop in spans:
        assert ((drawn >= start) & (drawn < stop)).any(), (start, stop)


# --------------------------------------------------------------------------- through the strategy
class NetworkGradients:
    """A pool's region_gradients backed by the tiny network: one forward per case, as the backend does."""

    def __init__(self, net: torch.nn.Module, layers: str, images: dict[str, np.ndarray]) -> None:
        self.net, self.images = net, images
        named = gradient_parameters(net, layers)
        self.params = [p for _, p in named]
        self.parameter_ranges = parameter_ranges(named)
        self.n_params = self.parameter_ranges[-1][2]

    def __call__(self, case_id: str, boxes: Sequence[Box], index: np.ndarray | None) -> np.ndarray:
        x = torch.as_tensor(self.images[case_id][None, None], dtype=torch.float32)
        masks = torch.zeros((len(boxes), *SHAPE))
        for i, b in enumerate(boxes):
            masks[(i, *b.slices())] = 1.0
        return network_region_gradients(self.net, x, masks, self.params, index)


@pytest.mark.parametrize("key", ["usim_c", "usim_f"])
def test_strategy_embeds_the_variant_s_layers(key: str) -> None:
    pool = make_pool()
    net = tiny_unet()
    layers = get_strategy(key).needs.gradient_layers
    rng = np.random.default_rng(1)
    images = {c: gt.astype(np.float32) + 0.3 * rng.normal(size=gt.shape) for c, gt in pool.ground_truth.items()}
    embedder = NetworkGradients(net, layers, images)
    view = dataclasses.replace(pool.view(), region_gradients=embedder, n_gradient_params=embedder.n_params)
    max_dim = 500
    strategy = get_strategy(key, {"max_dim": max_dim, "pool": "top"})  # 3 candidates per case: quick
    regions = strategy.query(make_context(view, key, query_size=3, n_per_case=3))
    assert len(regions) == 3
    info = regions[0].info
    assert info["gradient_layers"] == layers
    assert info["n_gradient_params"] == embedder.n_params and info["n_embedded_params"] <= max_dim
    modules = info["embedded_parameters"]
    assert sum(modules.values()) == info["n_embedded_params"]
    if key == "usim_c":
        weight = expected_bottleneck(net)
        assert list(modules) == [names_of(net)[id(weight)].removesuffix(".weight")]
    else:
        for i in range(len(net.decoder.stages)):
            assert any(m.startswith(f"decoder.stages.{i}.") for m in modules), (i, modules)
        assert all(m.startswith("decoder.stages.") for m in modules)
