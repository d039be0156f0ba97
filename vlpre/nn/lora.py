"""Low-rank adapters (LoRA, Hu et al. 2021): a Dense layer plus a trainable update A·B.

    y = x·W + (alpha / rank)·(x·A)·B + b

W [in, out] (and b) keep the pretrained layer's names (`kernel`, `bias`), so a checkpoint
loads into an adapted layer unchanged; A [in, rank] starts random and B [rank, out] at
zero, so an adapter starts as the identity on the pretrained model. `merge` folds every
adapter of a parameter tree into its kernel (W + (alpha / rank)·A·B): the merged tree runs
on the plain layer with the same outputs, and is what an export writes.

Freeze everything but the adapters with `config.trainable = (".*lora_[ab]",)`.
Shape letters (docs/adding_a_method.md#glossary): D input width, F output width; Q the rank.
"""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

# Names of the adapter factors inside an adapted layer's parameters.
A_NAME, B_NAME = "lora_a", "lora_b"


class LoRADense(nn.Module):
  """nn.Dense with a low-rank update; `names` are the kernel's logical axes (in, out)."""
  features: int
  rank: int
  alpha: float
  names: tuple[str | None, str | None]
  use_bias: bool = True
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  kernel_init: Callable = nn.initializers.normal(0.02)
  bias_init: Callable = nn.initializers.zeros

  @nn.compact
  def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
    width = x_BxLxD.shape[-1]
    part = nn.with_logical_partitioning
    kernel_DxF = self.param("kernel", part(self.kernel_init, self.names),
                            (width, self.features), self.param_dtype)
    # A as in the paper's reference code (Kaiming-uniform), B zero: the update starts at 0.
    a_DxQ = self.param(A_NAME, part(nn.initializers.he_uniform(), (self.names[0], None)),
                       (width, self.rank), self.param_dtype)
    b_QxF = self.param(B_NAME, part(nn.initializers.zeros, (None, self.names[1])),
                       (self.rank, self.features), self.param_dtype)
    x_BxLxD = x_BxLxD.astype(self.dtype)
    y_BxLxF = x_BxLxD @ kernel_DxF.astype(self.dtype)
    update_BxLxF = (x_BxLxD @ a_DxQ.astype(self.dtype)) @ b_QxF.astype(self.dtype)
    y_BxLxF = y_BxLxF + jnp.asarray(self.alpha / self.rank, self.dtype) * update_BxLxF
    if self.use_bias:
      bias_F = self.param("bias", part(self.bias_init, (self.names[1],)), (self.features,),
                          self.param_dtype)
      y_BxLxF = y_BxLxF + bias_F.astype(self.dtype)
    return y_BxLxF


def merge(params: Any, alpha: float) -> Any:
  """The tree with every adapter folded into its kernel (numpy or jax leaves).

  A layer is adapted when it holds `lora_a` and `lora_b` beside `kernel`; stacked
  (scanned) layers carry a leading layer axis on all three, handled by the batched matmul.
  The rank is read from the factors' shape.
  """
  flat = traverse_util.flatten_dict(params)
  out = {}
  for path, value in flat.items():
    if path[-1] in (A_NAME, B_NAME):
      continue
    if path[-1] == "kernel" and path[:-1] + (A_NAME,) in flat:
      a_DxQ, b_QxF = flat[path[:-1] + (A_NAME,)], flat[path[:-1] + (B_NAME,)]
      rank = np.shape(a_DxQ)[-1]
      value = value + (alpha / rank) * jnp.matmul(jnp.asarray(a_DxQ, jnp.float32),
                                                 jnp.asarray(b_QxF, jnp.float32))
      value = np.asarray(value, np.float32)
    out[path] = value
  return traverse_util.unflatten_dict(out)
