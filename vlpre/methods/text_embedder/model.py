"""A decoder LLM tuned into a text embedder: pooled, L2-normalised states of templated texts.

The model is `vlpre.text_encoders.PooledTextEncoder` (the very module a frozen encoder
runs in LIFT) around vlpre's decoder, built from `config.llm` (causal, or bidirectional
with `causal=False` as in LLM2Vec) with the options of `config.text_embedder`: the
template the texts are tokenised into, the pooling ("last": the template's last token,
PromptEOL; "mean") and low-rank adapters (`lora_rank` > 0). What trains is the config's
regexes (`frozen` / `trainable`): adapters only, the last layer group, or everything.

Batch: `text`, `text_mask` [B, P, L] (data.py: anchor, positive, optional hard negative).
Outputs: `z_anchor`, `z_positive` [B, E], `z_negative` [B, P - 2, E] (L2-normalised),
`logit_scale` (1 / temperature, fixed).
Parameters: `encoder/backbone/...`, the decoder's own names (plus `lora_a`, `lora_b`).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp
from flax import traverse_util

from vlpre import llm as llm_lib
from vlpre import methods
from vlpre.methods.text_embedder import data
from vlpre.text_encoders import PooledTextEncoder


class Model(nn.Module):
  encoder: PooledTextEncoder
  temperature: float = 0.05  # InfoNCE temperature of sentence embedders (SimCSE, E5)

  def embed_text(self, text, text_mask=None, train: bool = False):
    del train  # no dropout in the pretrained decoder
    if text_mask is None:
      text_mask = jnp.ones_like(text)
    return self.encoder(text, text_mask)

  def __call__(self, batch, *, train: bool = False):
    ids_BxPxL, mask_BxPxL = batch["text"], batch["text_mask"]
    rows, texts, length = ids_BxPxL.shape
    z_NxE = self.embed_text(ids_BxPxL.reshape(rows * texts, length),
                            mask_BxPxL.reshape(rows * texts, length))
    z_BxPxE = z_NxE.reshape(rows, texts, -1)
    return {"z_anchor": z_BxPxE[:, 0], "z_positive": z_BxPxE[:, 1], "z_negative": z_BxPxE[:, 2:],
            "logit_scale": jnp.asarray(1.0 / self.temperature, jnp.float32)}


def load_llm(config) -> llm_lib.LLM:
  """The base decoder with the embedder's tokenizer (template, no EOS after it for "last"
  pooling on a template, as PromptEOL reads the template's own last token)."""
  t = config.text_embedder
  return llm_lib.from_config(config.llm, dtype=config.get("dtype", "float32"), lm_head=False,
                             template=t.template, max_len=int(config.input.max_text_len),
                             append_eos=bool(t.append_eos))


def build(config) -> methods.Built:
  llm = load_llm(config)
  t = config.text_embedder
  decoder = llm.module.clone(lora_rank=int(t.lora_rank), lora_alpha=float(t.lora_alpha))
  encoder = PooledTextEncoder(backbone=decoder, pooling=t.pooling, normalize=True,
                              eos_id=llm.tokenizer.eos_id)
  model = Model(encoder=encoder, temperature=float(t.temperature))
  # One entry per pretrained weight: with adapters the decoder holds more (lora_a/b, left
  # as initialised) than the checkpoint gives.
  flat = traverse_util.flatten_dict(llm.params, sep="/")
  pretrained = {f"encoder/backbone/{k}": v for k, v in flat.items()}
  return methods.Built(model, pretrained=pretrained)


def build_tokenizer(config):
  return load_llm(config).tokenizer


def input_extras(config) -> methods.InputExtras:
  del config
  return methods.InputExtras(records=data.train_records)


def recipe_settings(config) -> dict[str, Any]:
  """How the tuned encoder embeds (vlpre.text_encoders.recipes): what a saved recipe holds."""
  t = config.text_embedder
  return dict(template=t.template, pooling=t.pooling, causal=bool(config.llm.causal),
              append_eos=bool(t.append_eos))


def tuned_settings(config) -> dict[str, Any]:
  """What a recipe was tuned from and with, written beside it."""
  fields = ("lora_rank", "lora_alpha", "temperature")
  return dict(base=config.llm.name, steps=int(config.total_steps),
              batch_size=int(config.batch_size), data=str(config.input.train),
              hard_negatives=bool(config.input.hard_negatives),
              frozen=list(config.get("frozen", ())), trainable=(
                  None if config.get("trainable") is None else list(config.trainable)),
              lr=float(config.optim.lr), seed=int(config.seed),
              **{f: config.text_embedder[f] for f in fields})
