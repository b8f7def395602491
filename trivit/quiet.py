"""Keeping the frameworks' start-up chatter off a person's terminal, for every ``trivit`` verb.

TF 2.21's C++ logging writes to file descriptor 2 before absl is initialised, whatever
``TF_CPP_MIN_LOG_LEVEL`` says, and a CPU-only machine also gets CUDA-probe errors: :func:`native_log_filter`
holds fd 2 while a framework loads and writes back everything else. :func:`quiet_frameworks` sets the
environment and Python-level log levels; call it before importing TF or JAX.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import tempfile
import warnings
from collections.abc import Iterator
from typing import Any

__all__ = ["quiet_frameworks", "native_log_filter", "import_quietly"]


def quiet_frameworks() -> None:
    """Silence TF's C++ start-up lines and absl/JAX warnings; call before importing the frameworks."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    for name in ("absl", "jax", "jax._src.xla_bridge", "tensorflow"):
        logging.getLogger(name).setLevel(logging.ERROR)
    with contextlib.suppress(ImportError):
        from absl import logging as absl_logging

        absl_logging.set_verbosity(absl_logging.ERROR)
    warnings.filterwarnings("ignore", message=r".*(An NVIDIA GPU may be present|Unable to initialize backend).*")


#: Lines TF/XLA's C++ logging writes to fd 2 while loading (it ignores TF_CPP_MIN_LOG_LEVEL until absl is
#: initialised): the absl pre-init notice, glog-style I/W lines, and the CPU-only machine's CUDA probe errors.
_NATIVE_NOISE = re.compile(r"(WARNING: All log messages before absl::InitializeLog|[IW]\d{4} \d\d:\d\d:[\d.]+ +\d+ "
                           r"[\w.]+:\d+\]|E\d{4} .*(cuInit|cuda_(platform|dnn|fft|blas|executor)|CUDA))")


@contextlib.contextmanager
def native_log_filter() -> Iterator[None]:
    """While the block runs, send file descriptor 2 to a temporary file; afterwards write back every line
    except framework start-up noise (:data:`_NATIVE_NOISE`). Python-level output is flushed around it."""
    try:
        sys.stderr.flush()
        kept = os.dup(2)
    except (OSError, ValueError):  # no real fd 2 (e.g. captured): nothing to filter
        yield
        return
    with tempfile.TemporaryFile() as buffer:
        os.dup2(buffer.fileno(), 2)
        try:
            yield
        finally:
            with contextlib.suppress(OSError, ValueError):
                sys.stderr.flush()
            os.dup2(kept, 2)
            os.close(kept)
            buffer.seek(0)
            text = buffer.read().decode("utf-8", errors="replace")
            sys.stderr.write("".join(ln for ln in text.splitlines(keepends=True) if not _NATIVE_NOISE.match(ln)))


def import_quietly(module: str) -> Any:
    """``importlib.import_module(module)`` with the frameworks' native start-up lines filtered out."""
    import importlib

    with native_log_filter():
        return importlib.import_module(module)
