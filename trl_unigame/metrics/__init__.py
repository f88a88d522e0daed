"""Evaluation metrics shipped with the package as `evaluate` modules, loadable offline by path.

```python
>>> import evaluate
>>> import trl_unigame.metrics
>>> vqa = evaluate.load(trl_unigame.metrics.path("vqa_accuracy"))
>>> vqa.compute(predictions=["two"], references=[["2"] * 4 + ["3"] * 6])
{'vqa_accuracy': 1.0}
```

Each metric is one self-contained file `<name>/<name>.py` (package data, not a subpackage): `evaluate.load` copies
that file alone into its module cache. [`load_module`] imports the same file directly, for the per-row functions.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from types import ModuleType


METRICS_DIR = os.path.dirname(os.path.abspath(__file__))
#: Names of the shipped metrics.
METRIC_NAMES = ("vqa_accuracy", "group_accuracy")


def path(name: str) -> str:
    """Folder of the shipped metric `name`, to pass to `evaluate.load`.

    Args:
        name (`str`): One of `"vqa_accuracy"`, `"group_accuracy"`.

    Raises:
        ValueError: for an unknown name, listing the shipped ones.
    """
    if name not in METRIC_NAMES:
        raise ValueError(f"Unknown metric {name!r}; trl_unigame ships {list(METRIC_NAMES)}.")
    folder = os.path.join(METRICS_DIR, name)
    if not os.path.isfile(os.path.join(folder, f"{name}.py")):
        raise FileNotFoundError(
            f"{folder}/{name}.py is missing: the package was installed without its package data (metrics/*/*.py)."
        )
    return folder


def load_module(name: str) -> ModuleType:
    """Imports the metric file `name` as a plain Python module (no `evaluate` cache), e.g. for its per-row scores:
    `load_module("vqa_accuracy").vqa_scores(predictions, references)`."""
    module_name = f"trl_unigame.metrics._{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, os.path.join(path(name), f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


__all__ = ["METRIC_NAMES", "load_module", "path"]
