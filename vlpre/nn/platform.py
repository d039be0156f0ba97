"""The platform a traced program is for: where the "auto" choices of vlpre.nn (the layer
loop's unroll, the attention implementation) look.

It is the default backend, except inside `target("tpu")`: vlpre.compile traces on a CPU
host a step that the TPU compiler compiles, which must make the choices a TPU run makes.
"""
from __future__ import annotations

import contextlib
import threading

import jax

_TARGET = threading.local()


def backend() -> str:
  """"cpu", "gpu" or "tpu": the platform programs traced now are compiled for."""
  return getattr(_TARGET, "platform", None) or jax.default_backend()


@contextlib.contextmanager
def target(platform: str):
  """Programs traced inside are for `platform`, whatever this host's default backend."""
  previous = getattr(_TARGET, "platform", None)
  _TARGET.platform = platform
  try:
    yield
  finally:
    _TARGET.platform = previous
