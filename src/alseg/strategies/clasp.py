"""ClaSP PE (class-stratified scheduled power predictive entropy; seed 000, nnActive ``class_power_pe66_exp``).

Maps: u_c(x) = PE(x) · p̄_c(x) for each foreground class c (probability channel = label value, nnU-Net's
convention) and PE(x) itself. Box means S on each case's stride grid, noised S̃ = log S + G / β_t,
G ~ Gumbel(0, 1), with a schedule over query rounds::

    β_t = β_max ** f(t / (R − 1))      t = round_index − 1 (0-based query index), R = ctx.n_rounds

f(x) = x ('exponential'; with R = 5 and β_max = 100 the βs are 1, 3.16, 10, 31.6) or a logistic curve
rescaled to f(0) = 0, f(1) = 1 ('sigmoid', steepness k). For R <= 2 the fraction is 0 (β = 1), and it is
clamped to [0, 1] outside the query rounds.

Per case the maps (every foreground class and PE) are visited in a random order; each takes up to its share
of ``n_per_case`` boxes greedily by S̃ from one grid of free positions shared by all maps, so candidates of
different maps never overlap. Shares per case, as nnActive: int(n_per_case · fg_share / (n_fg + 1)) per class
(nnActive's divisor counts the PE map), int(n_per_case · (1 − fg_share)) for PE, at least 1 each.

Query split: Q_fg = floor(fg_share · Q) divided equally over the foreground classes, the remainder one each
to randomly chosen classes; Q − Q_fg by the PE map. Each map's quota takes its best candidates by S̃ over
the pool. When a map has fewer candidates than its quota (a nearly full pool), the shortfall is filled from
all leftover candidates by S̃ (recorded as ``fill``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, ClassVar, Literal

import numpy as np

from alseg.data.regions import Region
from alseg.scoring.boxes import Candidate, greedy_nms, top_k
from alseg.strategies.base import Needs, NotEnoughCandidatesError, QueryContext, regions_from_candidates
from alseg.strategies.power import check_beta, power_noise
from alseg.strategies.uncertainty import stream_cases
from alseg.uncertainty.measures import mean_probabilities, predictive_entropy

Schedule = Literal["exponential", "sigmoid"]
SCHEDULES = ("exponential", "sigmoid")
#: the map key of plain PE (foreground classes are keyed by their label value)
PE_MAP = -1


def schedule_fraction(t: int, n_rounds: int) -> float:
    """x = t / (R − 1), clamped to [0, 1]; 0 when R <= 2 (a single query round, or none)."""
    if n_rounds <= 2:
        return 0.0
    return min(1.0, max(0.0, t / (n_rounds - 1)))


def scheduled_beta(
    t: int, n_rounds: int, beta_max: float = 100.0, schedule: Schedule = "exponential", steepness: float = 10.0
) -> float:
    """β_t = β_max ** f(x), x = t / (R − 1); f(x) = x (exponential) or a [0, 1]-rescaled logistic (sigmoid).

    >>> [round(scheduled_beta(t, 5), 2) for t in range(4)]
    [1.0, 3.16, 10.0, 31.62]
    """
    beta_max = check_beta(beta_max, "beta_max")
    x = schedule_fraction(t, n_rounds)
    if schedule == "exponential":
        f = x
    elif schedule == "sigmoid":
        k = float(steepness)
        if not math.isfinite(k) or k <= 0:
            raise ValueError(f"sigmoid steepness must be a finite number > 0, got {steepness!r}")

        def sig(z: float) -> float:
            return 1.0 / (1.0 + math.exp(-z))

        lo, hi = sig(-k / 2), sig(k / 2)
        f = (sig(k * (x - 0.5)) - lo) / (hi - lo)
    else:
        raise ValueError(f"unknown beta schedule {schedule!r}; expected one of {SCHEDULES}")
    return float(beta_max**f)


def split_query(
    query_size: int, foreground_labels: Sequence[int], fg_share: float, rng: np.random.Generator
) -> dict[int, int]:
    """Quota per map: Q_fg = floor(fg_share · Q) split equally over the classes (remainder to random classes).

    Returns ``{label: n, ..., PE_MAP: Q − Q_fg}``; without foreground classes everything goes to PE.
    """
    if not 0.0 <= fg_share <= 1.0:
        raise ValueError(f"fg_share must lie in [0, 1], got {fg_share!r}")
    labels = [int(c) for c in foreground_labels]
    if not labels:
        return {PE_MAP: query_size}
    n_fg = math.floor(fg_share * query_size + 1e-9)
    quotas = {c: n_fg // len(labels) for c in labels}
    for i in rng.choice(len(labels), size=n_fg % len(labels), replace=False):
        quotas[labels[int(i)]] += 1
    quotas[PE_MAP] = query_size - n_fg
    return quotas


def per_case_caps(n_per_case: int, n_fg: int, fg_share: float) -> tuple[int, int]:
    """Boxes per case each map may take: (per foreground class, for PE), at least 1 each.

    nnActive's (``ClassBalancedEntropy_66FG.query_file_from_dict``): int(n · fg_share / (n_fg + 1)) per class
    (its divisor counts the PE map too) and int(n · (1 − fg_share)) for PE; with n = 20 and two classes 4 and 6.

    >>> per_case_caps(20, 2, 0.66)
    (4, 6)
    """
    if n_fg == 0:
        return 0, max(1, n_per_case)
    per_class = max(1, int(n_per_case * fg_share / (n_fg + 1) + 1e-9))
    pe = max(1, int(n_per_case * (1.0 - fg_share) + 1e-9))
    return per_class, pe


def clasp_candidates(ctx: QueryContext, beta: float | None, fg_share: float = 0.66) -> dict[int, list[Candidate]]:
    """Per map (foreground label or :data:`PE_MAP`), the non-overlapping candidates over the pool.

    Scores are S̃ = log S + G / β, or the plain box means S when ``beta`` is None (no noise; the visit
    order is still drawn, from the same generator as with noise). ``info`` records ``class`` (label, or
    None for PE), ``box_score`` (S), and with noise ``gumbel`` and ``beta``.
    """
    labels = [int(c) for c in ctx.pool.foreground_labels]
    keys = [*labels, PE_MAP]
    cap_class, cap_pe = per_case_caps(ctx.n_per_case, len(labels), fg_share)
    out: dict[int, list[Candidate]] = {k: [] for k in keys}
    for case in stream_cases(ctx):
        mean = mean_probabilities(case.probs)
        if any(not 0 <= c < mean.shape[0] for c in labels):
            raise ValueError(
                f"foreground labels {labels} of case {case.case_id!r} are outside its probability channels "
                f"0..{mean.shape[0] - 1}"
            )
        pe = predictive_entropy(mean[None])
        grids = {PE_MAP: case.box_means(pe)}
        for c in labels:
            grids[c] = case.box_means(pe * mean[c])
        del mean, pe
        order = ctx.rng(f"order/{case.case_id}").permutation(len(keys))
        noise_rng = ctx.rng(f"gumbel/{case.case_id}")
        for i in order:
            key = keys[int(i)]
            scores = grids[key]
            if beta is None:
                ranked, gumbel = scores, None
            else:
                ranked, gumbel = power_noise(scores, beta, noise_rng)
            cap = cap_pe if key == PE_MAP else cap_class
            for c in greedy_nms(case.case_id, ranked, case.box_size, case.stride, case.free, cap):
                idx = case.grid_index(c.start)
                info: dict[str, Any] = {
                    "measure": "clasp_pe",
                    "class": None if key == PE_MAP else key,
                    "box_score": float(scores[idx]),
                }
                if beta is not None and gumbel is not None:
                    info.update(gumbel=float(gumbel[idx]), beta=float(beta))
                out[key].append(dataclasses.replace(c, info=info))
    return out


def select_by_quota(candidates: dict[int, list[Candidate]], quotas: dict[int, int], query_size: int) -> list[Candidate]:
    """Each map's best ``quotas[map]`` candidates; a shortfall is filled from all leftovers by score."""
    available = sum(len(v) for v in candidates.values())
    if available < query_size:
        raise NotEnoughCandidatesError(query_size, available)
    chosen: list[Candidate] = []
    leftovers: list[Candidate] = []
    for key, of_map in candidates.items():
        ranked = top_k(of_map, len(of_map))
        n = quotas.get(key, 0)
        chosen.extend(ranked[:n])
        leftovers.extend(ranked[n:])
    shortfall = query_size - len(chosen)
    if shortfall > 0:
        chosen.extend(dataclasses.replace(c, info={**c.info, "fill": True}) for c in top_k(leftovers, shortfall))
    return chosen


@dataclass
class ClaspPEStrategy:
    """ClaSP PE: class-stratified power PE with a β schedule that turns greedy over the rounds."""

    schedule: Schedule = "exponential"
    beta_max: float = 100.0
    fg_share: float = 0.66
    steepness: float = 10.0  # sigmoid schedule only

    key: ClassVar[str] = "clasp_pe"
    description: ClassVar[str] = "class-stratified power PE, beta scheduled 1 -> beta_max over rounds (ClaSP PE)"
    needs: ClassVar[Needs] = Needs(probabilities=True)

    def params(self) -> dict[str, Any]:
        return asdict(self)

    def check(self) -> None:
        """Parameter errors, raised when the experiment is created: the schedule at every t, and the share."""
        for t in range(3):
            scheduled_beta(t, 4, self.beta_max, self.schedule, self.steepness)
        if not 0.0 <= float(self.fg_share) <= 1.0:
            raise ValueError(f"fg_share must lie in [0, 1], got {self.fg_share!r}")

    def beta(self, ctx: QueryContext) -> float:
        """β for this query: t = round_index − 1 (round 0 is the starting budget)."""
        return scheduled_beta(ctx.round_index - 1, ctx.n_rounds, self.beta_max, self.schedule, self.steepness)

    def select(self, ctx: QueryContext, beta: float | None) -> list[Region]:
        """The query with a given β (None: without noise, the deterministic top by class score)."""
        quotas = split_query(ctx.query_size, ctx.pool.foreground_labels, self.fg_share, ctx.rng("quota"))
        candidates = clasp_candidates(ctx, beta, self.fg_share)
        chosen = select_by_quota(candidates, quotas, ctx.query_size)
        return regions_from_candidates(chosen, ctx, self.key)

    def query(self, ctx: QueryContext) -> list[Region]:
        return self.select(ctx, self.beta(ctx))
