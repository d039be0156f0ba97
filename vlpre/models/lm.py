"""Language modelling on captions: a pretrained decoder (vlpre.llm) trained with the LM loss.

The simplest method that TRAINS the decoder LLM end to end in the one trainer (what LCL,
HIVE and bridge training build on): captions are tokenised with the LLM's own tokenizer
(ending in EOS), and every caption token is predicted from the ones before it.

    config.model_name = "lm"; config.losses = {"lm": 1.0}

Outputs (vlpre.losses.language_modeling): `lm_logits` [B, L-1, V], `lm_targets` [B, L-1]
(the next token), `lm_weights` [B, L-1] (1 where that next token is a real one).
Parameters: `llm/...` (the decoder; freeze parts with config.frozen, e.g. the first 10
layers with `llm.layer_groups = (10, 20)` and `frozen = ("llm/layers_0to9/.*",)`).
"""
from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from vlpre import llm as llm_lib
from vlpre import models


class Model(nn.Module):
  llm: llm_lib.Decoder

  def __call__(self, batch, *, train: bool = False):
    del train  # no dropout in the pretrained decoder
    tokens_BxL, mask_BxL = batch["text"], batch["text_mask"]
    out = self.llm(tokens_BxL, mask_BxL, return_logits=True)
    return {"lm_logits": out.logits[:, :-1], "lm_targets": tokens_BxL[:, 1:],
            "lm_weights": mask_BxL[:, 1:]}


@functools.lru_cache(maxsize=2)
def _load(name: str, dtype: str, layer_groups: tuple[int, ...], remat: str, max_len: int):
  return llm_lib.load(name, dtype=jnp.dtype(dtype), layer_groups=layer_groups, remat=remat,
                      max_len=max_len)


def load_llm(config) -> llm_lib.LLM:
  c = config.llm
  return _load(c.name, config.get("dtype", "float32"), tuple(c.get("layer_groups", ())),
               c.get("remat", "none"), config.input.max_text_len)


def build(config) -> models.Built:
  llm = load_llm(config)
  return models.Built(Model(llm=llm.module), pretrained={"llm": llm.params})


def build_tokenizer(config) -> Any:
  return load_llm(config).tokenizer
