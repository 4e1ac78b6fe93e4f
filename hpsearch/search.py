"""How Optuna searches: samplers and pruners by name, with Optuna's own argument names."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from optuna import pruners, samplers

from hpsearch.registry import Registry


@dataclass(frozen=True)
class SamplerFacts:
    # Arguments hpsearch sets unless the study file does.
    defaults: dict[str, Any] = field(default_factory=dict)
    # True for the grid: the study enumerates its configurations up front and the sampler only
    # fills in what a queued configuration does not fix (nothing, for a complete grid).
    enumerates: bool = False


@dataclass(frozen=True)
class PrunerFacts:
    nested: str | None = None  # the study-file key of a pruner this one wraps


def grid() -> samplers.BaseSampler:
    """Every combination of the study's choices, each once, conditional parameters included.

    Optuna's GridSampler takes the product of every parameter, so with ``[optimizer.sgd] momentum``
    it would repeat each Adam configuration once per unused momentum. hpsearch queues the union of
    each branch's own grid when the study is created, and the workers take the queued trials.
    """
    return _QueuedOnly()


SAMPLERS: Registry[Callable[..., samplers.BaseSampler], SamplerFacts] = Registry("sampler", SamplerFacts)
# TPE models the joint, conditional space (momentum only under SGD, say) instead of treating each
# parameter alone; the constant liar keeps parallel workers from sampling the same point.
SAMPLERS.register(
    samplers.TPESampler,
    name="tpe",
    defaults={"multivariate": True, "group": True, "constant_liar": True},
)
SAMPLERS.register(samplers.RandomSampler, name="random")
SAMPLERS.register(grid, enumerates=True)
SAMPLERS.register(samplers.QMCSampler, name="qmc")
SAMPLERS.register(samplers.CmaEsSampler, name="cmaes")
SAMPLERS.register(samplers.GPSampler, name="gp")

PRUNERS: Registry[Callable[..., pruners.BasePruner], PrunerFacts] = Registry(
    "pruner", PrunerFacts, fixed=("wrapped_pruner",)
)
PRUNERS.register(pruners.NopPruner, name="none")
PRUNERS.register(pruners.MedianPruner, name="median")
PRUNERS.register(pruners.PercentilePruner, name="percentile")
PRUNERS.register(pruners.SuccessiveHalvingPruner, name="successive_halving")
PRUNERS.register(pruners.HyperbandPruner, name="hyperband")
PRUNERS.register(pruners.ThresholdPruner, name="threshold")
PRUNERS.register(pruners.PatientPruner, name="patient", nested="wrapped")


def build_sampler(name: str, **kwargs: Any) -> samplers.BaseSampler:
    """Sampler ``name`` with hpsearch's defaults under the given arguments."""
    return SAMPLERS[name](**{**SAMPLERS.facts(name).defaults, **kwargs})


def build_pruner(name: str, **kwargs: Any) -> pruners.BasePruner:
    """Pruner ``name``; ``patient`` wraps the pruner given as its ``wrapped`` table."""
    nested = PRUNERS.facts(name).nested
    if nested:
        inner = dict(kwargs.pop(nested, {"name": "none"}))
        kwargs["wrapped_pruner"] = build_pruner(inner.pop("name"), **inner)
    return PRUNERS[name](**kwargs)


class GridExhausted(Exception):
    """A grid study was asked for a trial after every configuration was taken."""


class _QueuedOnly(samplers.BaseSampler):
    """The grid's sampler: queued trials fix every parameter, so it is only asked once the queue is
    empty (another worker took the last configuration meanwhile), and then it has nothing to give."""

    def infer_relative_search_space(self, study: Any, trial: Any) -> dict[str, Any]:
        return {}

    def sample_relative(self, study: Any, trial: Any, search_space: Any) -> dict[str, Any]:
        return {}

    def sample_independent(self, study: Any, trial: Any, param_name: str, param_distribution: Any) -> Any:
        raise GridExhausted(f"every configuration of the grid is taken ({param_name} has none left)")
