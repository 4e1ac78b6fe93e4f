"""How Optuna searches: samplers and pruners by name, with Optuna's own argument names."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from optuna import pruners, samplers

from hpsearch.registry import Registry

SAMPLERS: Registry[Callable[..., samplers.BaseSampler]] = Registry("sampler", fixed=("search_space",))
# TPE models the joint, conditional space (momentum only under SGD, say) instead of treating each
# parameter alone; the constant liar keeps parallel workers from sampling the same point.
SAMPLERS.add(
    "tpe",
    samplers.TPESampler,
    defaults={"multivariate": True, "group": True, "constant_liar": True},
)
SAMPLERS.add("random", samplers.RandomSampler)
SAMPLERS.add("grid", samplers.GridSampler)
SAMPLERS.add("qmc", samplers.QMCSampler)
SAMPLERS.add("cmaes", samplers.CmaEsSampler)
SAMPLERS.add("gp", samplers.GPSampler)

PRUNERS: Registry[Callable[..., pruners.BasePruner]] = Registry("pruner", fixed=("wrapped_pruner",))
PRUNERS.add("none", pruners.NopPruner)
PRUNERS.add("median", pruners.MedianPruner)
PRUNERS.add("percentile", pruners.PercentilePruner)
PRUNERS.add("successive_halving", pruners.SuccessiveHalvingPruner)
PRUNERS.add("hyperband", pruners.HyperbandPruner)
PRUNERS.add("threshold", pruners.ThresholdPruner)
PRUNERS.add("patient", pruners.PatientPruner, nested="wrapped")


def build_sampler(
    name: str, search_space: dict[str, list[Any]] | None = None, **kwargs: Any
) -> samplers.BaseSampler:
    """Sampler ``name``; ``grid`` takes the study's choices as its ``search_space``."""
    args = {**SAMPLERS.meta[name].get("defaults", {}), **kwargs} if name in SAMPLERS else kwargs
    if name == "grid":
        args["search_space"] = search_space or {}
    return SAMPLERS[name](**args)


def build_pruner(name: str, **kwargs: Any) -> pruners.BasePruner:
    """Pruner ``name``; ``patient`` wraps the pruner given as its ``wrapped`` table."""
    nested = PRUNERS.meta.get(name, {}).get("nested")
    if nested:
        inner = dict(kwargs.pop(nested, {"name": "none"}))
        kwargs["wrapped_pruner"] = build_pruner(inner.pop("name"), **inner)
    return PRUNERS[name](**kwargs)
