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

from typing import Any

import flax.linen as nn

from vlpre import llm as llm_lib
from vlpre import methods


class Model(nn.Module):
  llm: llm_lib.Decoder

  def __call__(self, batch, *, train: bool = False):
    del train  # no dropout in the pretrained decoder
    tokens_BxL, mask_BxL = batch["text"], batch["text_mask"]
    out = self.llm(tokens_BxL, mask_BxL, return_logits=True)
    return {"lm_logits": out.logits[:, :-1], "lm_targets": tokens_BxL[:, 1:],
            "lm_weights": mask_BxL[:, 1:]}


def load_llm(config) -> llm_lib.LLM:
  return llm_lib.from_config(config.llm, dtype=config.get("dtype", "float32"),
                             max_len=config.input.max_text_len)


def build(config) -> methods.Built:
  llm = load_llm(config)
  return methods.Built(Model(llm=llm.module), pretrained={"llm": llm.params})


def build_tokenizer(config) -> Any:
  return load_llm(config).tokenizer
