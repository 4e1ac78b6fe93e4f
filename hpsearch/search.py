"""How Optuna searches: samplers and pruners by name, with Optuna's own argument names."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from optuna import Study, pruners, samplers
from optuna.distributions import BaseDistribution, CategoricalDistribution, IntDistribution
from optuna.trial import FrozenTrial, TrialState

from hpsearch import record
from hpsearch.registry import Registry

# What a study file that names none searches with: the pair that benchmarks/search.py measured
# reaching the unpruned search's best (within 0.3 points) under every seed, with the fewest epochs
# (README, "Search efficiency").
DEFAULT_SAMPLER = "random"
DEFAULT_PRUNER = "median"


@dataclass(frozen=True)
class SamplerFacts:
    # Arguments hpsearch sets unless the study file does.
    defaults: dict[str, Any] = field(default_factory=dict)
    # False for a sampler that optimises one objective only (raises on a multi-objective study).
    multi_objective: bool = True
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
SAMPLERS.register(samplers.CmaEsSampler, name="cmaes", multi_objective=False)
SAMPLERS.register(samplers.NSGAIISampler, name="nsga2")
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
    """Pruner ``name``; ``patient`` wraps the pruner given as its ``wrapped`` table, and without one
    stops a trial on its patience alone (Optuna's early stopping)."""
    nested = PRUNERS.facts(name).nested
    if nested:
        inner = dict(kwargs.pop(nested, {}))
        kwargs["wrapped_pruner"] = build_pruner(inner.pop("name"), **inner) if inner else None
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


class AvoidOom(samplers.BaseSampler):
    """``base``, except that it samples no value of the batch size ``param`` at or above the smallest
    batch size a failed trial of the study ran out of device memory with (``record.OOM_BATCH_SIZE``).

    Such a value becomes the largest one ``param`` can take below that ceiling; where it can take
    none, the value stays, and that trial fails again (and counts towards ``[study]
    max_fail_fraction``). Optuna's ``constraints_func`` is never asked about a failed trial and its
    samplers learn from complete and pruned trials only, so they could not be told this otherwise.
    """

    def __init__(self, base: samplers.BaseSampler, param: str) -> None:
        self.base, self.param = base, param

    def infer_relative_search_space(self, study: Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return self.base.infer_relative_search_space(study, trial)

    def sample_relative(
        self, study: Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        params = self.base.sample_relative(study, trial, search_space)
        # Lowered here rather than left out to be drawn alone: a multivariate TPE or CMA-ES logs a
        # warning for every parameter it has to draw on its own.
        if self.param in params:
            params[self.param] = self._below_ceiling(study, search_space[self.param], params[self.param])
        return params

    def sample_independent(
        self, study: Study, trial: FrozenTrial, param_name: str, param_distribution: BaseDistribution
    ) -> Any:
        value = self.base.sample_independent(study, trial, param_name, param_distribution)
        if param_name == self.param:
            value = self._below_ceiling(study, param_distribution, value)
        return value

    def before_trial(self, study: Study, trial: FrozenTrial) -> None:
        self.base.before_trial(study, trial)

    def after_trial(
        self, study: Study, trial: FrozenTrial, state: TrialState, values: Sequence[float] | None
    ) -> None:
        self.base.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self.base.reseed_rng()

    def _below_ceiling(self, study: Study, distribution: BaseDistribution, value: Any) -> Any:
        failed = study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
        sizes = [t.user_attrs.get(record.OOM_BATCH_SIZE) for t in failed]
        ceiling = min((s for s in sizes if isinstance(s, int)), default=None)
        if ceiling is None or value < ceiling:
            return value
        if isinstance(distribution, CategoricalDistribution):
            under = [c for c in distribution.choices if isinstance(c, int) and c < ceiling]
            return max(under, default=value)
        if isinstance(distribution, IntDistribution):
            low, step = distribution.low, distribution.step
            top = low + (ceiling - 1 - low) // step * step  # the largest value on the range's steps
            return top if top >= low else value
        return value
