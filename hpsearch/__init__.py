"""hpsearch: hyperparameter search for image classifiers, built on Optuna.

The library behind the ``hpsearch`` command::

    import hpsearch

    spec = hpsearch.load_spec("quickstart")                     # a study file, validated
    study = hpsearch.open_study(spec, "sqlite:///hpsearch.db")  # create it, or resume it
    hpsearch.run_study(spec, study, n_trials=4)                 # train, report, prune, record
    print(hpsearch.best_table(study).to_string())               # the seed-style table

Names are imported on first use, so ``hpsearch --help`` and Ctrl-C while starting stay quick.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "HpsearchError": "hpsearch.errors",
    "SpecError": "hpsearch.spec",
    "StorageError": "hpsearch.storage",
    "StudySpec": "hpsearch.spec",
    "TrialConfig": "hpsearch.spec",
    "load_spec": "hpsearch.spec",
    "open_study": "hpsearch.study",
    "run_study": "hpsearch.study",
    "load_stored_study": "hpsearch.storage",
    "best_table": "hpsearch.export",
    "best_per": "hpsearch.export",
    "trials_table": "hpsearch.export",
    "write_table": "hpsearch.export",
    "TrialRecord": "hpsearch.record",
}
__all__ = [
    "HpsearchError",
    "SpecError",
    "StorageError",
    "StudySpec",
    "TrialConfig",
    "TrialRecord",
    "best_per",
    "best_table",
    "load_spec",
    "load_stored_study",
    "open_study",
    "run_study",
    "trials_table",
    "write_table",
]

if TYPE_CHECKING:
    from hpsearch.errors import HpsearchError
    from hpsearch.export import best_per, best_table, trials_table, write_table
    from hpsearch.record import TrialRecord
    from hpsearch.spec import SpecError, StudySpec, TrialConfig, load_spec
    from hpsearch.storage import StorageError, load_stored_study
    from hpsearch.study import open_study, run_study


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'hpsearch' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
