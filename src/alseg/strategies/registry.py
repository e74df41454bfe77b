"""The strategy registry: an explicit dict from key to strategy class (no plugin discovery).

A strategy is a small dataclass: ``__init__`` stores its parameters untouched, ``params()`` returns them as a
JSON-able dict, an optional ``check()`` raises ``ValueError`` on a bad parameter (called by
:func:`get_strategy`, so a bad parameter fails when the experiment is created), and the class declares
``key``, a one-line ``description`` and ``needs``. A variant that only
changes parameter defaults is a :func:`preset` of its class, not a hand-written subclass.

>>> s = get_strategy("random_fg66")
>>> get_strategy("random_fg66", s.params()).params() == s.params()
True
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, TypeVar

from alseg.strategies.base import Strategy
from alseg.strategies.clasp import ClaspPEStrategy
from alseg.strategies.embedding import BadgeStrategy, CoresetStrategy
from alseg.strategies.power import PowerBaldStrategy, PowerPEStrategy, SoftRankBaldStrategy
from alseg.strategies.random import FG66, RandomForegroundStrategy, RandomStrategy
from alseg.strategies.stochastic_batches import StochasticBatchesStrategy
from alseg.strategies.uncertainty import BaldStrategy, EntropyStrategy, MeanStdStrategy
from alseg.strategies.usim import USIMStrategy

T = TypeVar("T")


def preset(base: type[T], key: str, description: str, **defaults: Any) -> type[T]:
    """The dataclass ``base`` registered under another ``key`` with other parameter defaults.

    The result behaves exactly like ``base``; only its defaults, ``key`` and ``description`` differ.
    """
    names = {f.name: f for f in dataclasses.fields(base)}  # type: ignore[arg-type]
    unknown = sorted(set(defaults) - set(names))
    if unknown:
        raise ValueError(f"preset {key!r}: {base.__name__} has no parameter(s) {unknown}; valid: {sorted(names)}")
    fields = [(n, names[n].type, dataclasses.field(default=v)) for n, v in defaults.items()]
    cls_name = "".join(part.capitalize() for part in key.split("_")) + "Strategy"
    cls = dataclasses.make_dataclass(
        cls_name, fields, bases=(base,), namespace={"key": key, "description": description}
    )
    cls.__module__ = base.__module__
    cls.__doc__ = f"Preset {key!r} of {base.__name__}: {description}"
    return cls


STRATEGIES: dict[str, type] = {
    cls.key: cls
    for cls in (
        RandomStrategy,
        RandomForegroundStrategy,
        preset(
            RandomForegroundStrategy,
            "random_fg66",
            "uniform boxes / boxes centred on class / border voxels, 1/3 each (reads GT)",
            p_uniform=FG66[0],
            p_class=FG66[1],
            p_border=FG66[2],
        ),
        EntropyStrategy,
        BaldStrategy,
        MeanStdStrategy,
        PowerPEStrategy,
        PowerBaldStrategy,
        SoftRankBaldStrategy,
        ClaspPEStrategy,
        StochasticBatchesStrategy,
        CoresetStrategy,
        BadgeStrategy,
        USIMStrategy,
        preset(
            USIMStrategy,
            "usim_f",
            "USIMF: FLQMI over a Fisher kernel of region gradients, query set ∝ uncertainty",
            similarity="fisher",
        ),
    )
}


def get_strategy(key: str, params: Mapping[str, Any] | None = None) -> Strategy:
    """The strategy registered as ``key``, built with ``params`` (the class defaults where absent)."""
    if key not in STRATEGIES:
        raise ValueError(f"unknown strategy {key!r}; valid keys: {', '.join(sorted(STRATEGIES))}")
    cls = STRATEGIES[key]
    params = dict(params or {})
    valid = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = sorted(set(params) - set(valid))
    if unknown:
        expected = ", ".join(valid) if valid else "none"
        raise ValueError(f"strategy {key!r} has no parameter(s) {', '.join(unknown)}; its parameters: {expected}")
    strategy = cls(**params)
    check = getattr(strategy, "check", None)
    if check is not None:  # parameter errors now, when the experiment is created, not after round 0 trained
        try:
            check()
        except (TypeError, ValueError) as err:
            raise ValueError(f"strategy {key!r}: {err}") from None
    return strategy


def describe_strategies() -> list[dict[str, Any]]:
    """Every registered strategy as JSON-able data: key, description, parameters with their defaults, and what
    it needs with its default parameters (``alseg strategies --json``)."""
    out = []
    for key in sorted(STRATEGIES):
        strategy = get_strategy(key)
        out.append(
            {
                "key": key,
                "description": STRATEGIES[key].description,
                "params": strategy.params(),
                "needs": dataclasses.asdict(strategy.needs),
            }
        )
    return out


def list_strategies() -> list[tuple[str, str]]:
    """``(key, description)`` for every registered strategy, sorted by key."""
    return [(key, STRATEGIES[key].description) for key in sorted(STRATEGIES)]
