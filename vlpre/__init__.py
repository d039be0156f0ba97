"""vlpre: pre-training vision encoders with the help of large language models, in JAX."""
import sys as _sys

# tensorboardX (metrics' event-file writer) imports torch when it is installed, for writer
# features vlpre does not use (its SummaryWriter's torch tensors): 1.5 s and ~180 MB in
# every vlpre process, each CLI run, subprocess, notebook kernel and test worker. It is
# imported here first with torch hidden, and torch imports as usual afterwards.
if "torch" not in _sys.modules and "tensorboardX" not in _sys.modules:
  _sys.modules["torch"] = None  # `import torch` raises ImportError, which tensorboardX allows
  try:
    import tensorboardX  # noqa: F401  pylint: disable=unused-import
  finally:
    del _sys.modules["torch"]
