"""The training application of mamlpp_ext: runs, checkpoints, scoring and the commands.

* :mod:`~mamlpp_ext.training.trainer` — ``Trainer``: the outer loop over a run folder;
* :mod:`~mamlpp_ext.training.checkpoints` — atomic checkpoint files and RNG state;
* :mod:`~mamlpp_ext.training.run_data` — ``DataOptions`` and the episode streams of a run;
* :mod:`~mamlpp_ext.training.scoring` — accuracy and 95% confidence intervals, ensembles;
* :mod:`~mamlpp_ext.training.distributed` — the torchrun process strategy;
* commands: :mod:`~mamlpp_ext.training.train` (``mamlpp-train``),
  :mod:`~mamlpp_ext.training.evaluate` (``mamlpp-eval``), :mod:`~mamlpp_ext.training.plot`
  (``mamlpp-plot``).

Uses the model and data layers; nothing below imports it.
"""

from .run_data import DataOptions
from .scoring import score_tasks
from .trainer import SingleProcess, Trainer, TrainingInterrupted

__all__ = ["DataOptions", "SingleProcess", "Trainer", "TrainingInterrupted", "score_tasks"]
