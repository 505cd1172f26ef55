"""The one place where flexunet relies on what Keras keeps private (flexunet never imports
search, so it cannot use ``search/store/_internals.py``; this is its own adapter).

- ``Model._symbolic_build(data_batch=...)``: builds a compiled model's loss and metric state
  from example shapes. Keras on JAX otherwise builds it from the first batch as the data gives
  it, before any step runs, and flexunet's batches are raw uint8 without a class axis
  (``flexunet.data.batches``). Tested in ``tests/test_internals.py``.

Example::

    >>> import keras, numpy as np
    >>> network = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, activation="softmax")])
    >>> network.compile(loss="categorical_crossentropy", metrics=["accuracy"])
    >>> compiled = network.metrics[1]  # the compiled metrics ("accuracy")
    >>> compiled.built
    False
    >>> build_compiled_state(network, (np.zeros((1, 4), np.float32), np.zeros((1, 2), np.float32)))
    >>> compiled.built, [v.name for v in compiled.variables]
    (True, ['total', 'count'])
"""

from __future__ import annotations

from typing import Any

__all__ = ["build_compiled_state"]


def build_compiled_state(network: Any, data_batch: tuple[Any, Any]) -> None:
    """Build ``network``'s compiled loss and metrics for batches shaped like ``data_batch``
    ((images, targets)); a no-op where they are built already."""
    network._symbolic_build(data_batch=data_batch)
