"""Import Keras and its backend (TensorFlow) without their start-up chatter on the terminal."""

from __future__ import annotations

import os
import sys
import tempfile


def quiet_import() -> None:
    """Import Keras, and with it its backend, once with file descriptor 2 sent to a temporary file.

    TensorFlow's C++ runtime prints informational lines (oneDNN, CUDA probing) to stderr at
    import, before any log level applies, which buries the one-line errors of the CLI. What it
    printed is replayed if the import fails. Keras imports TensorFlow itself when that is its
    backend; with ``KERAS_BACKEND=jax`` (how bench/gpu.sh trains where no TensorFlow is
    installed) TensorFlow is not needed to train or search.
    """
    if "keras" in sys.modules:
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            import keras  # noqa: F401
        except BaseException:
            os.dup2(saved, 2)
            captured.seek(0)
            sys.stderr.write(captured.read().decode("utf-8", "replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)
    from flexunet.devices import apply_memory_limit

    apply_memory_limit()  # before anything touches the GPU
