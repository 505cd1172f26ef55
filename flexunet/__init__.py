"""FlexUNet: a flexible multiclass U-Net in TensorFlow/Keras, configured by a seed-format
``train_eval_infer.config``.

Example::

    import flexunet

    config = flexunet.load_config("runs/ct-ich-sample/data/train_eval_infer.config")
    result = flexunet.train(config)           # best model and learning curves in [train] model_dir
    print(flexunet.evaluate(config).summary)  # test-split metrics

Names are imported on first use, so that ``import flexunet`` does not load TensorFlow.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "Config": ("flexunet.config", "Config"),
    "load_config": ("flexunet.config", "load"),
    "ConfigError": ("flexunet.errors", "ConfigError"),
    "FlexUNetError": ("flexunet.errors", "FlexUNetError"),
    "build_model": ("flexunet.model", "build"),
    "train": ("flexunet.train", "train"),
    "evaluate": ("flexunet.evaluate", "evaluate"),
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'flexunet' has no attribute {name!r}")
    module, attr = _EXPORTS[name]
    return getattr(import_module(module), attr)
