"""HIVE: hierarchical ViT→LLM cross-attention pre-training of vision encoders (arXiv 2604.00086).

A captioner whose training signal reaches the vision encoder: a ViT (`img`, from scratch
or `init_from` a vlpre run, e.g. the tiny CLIP or LIFT tower) and the packaged SmolLM2
(`llm`, vlpre.llm) trained with next-token loss on the caption text only.

  mode="hive"  for each pair (ViT block b → LLM layer l) of `pairs` (1-based), block b's
               output goes through its own LayerNorm + MLP projector (`proj_<b>to<l>`)
               and separate image K/V projections; the keys get RMSNorm (QK-norm: the
               LLM's queries that score them are RMS-normalised too, with a learned
               gain) and 2D RoPE at the patch's (row, column). They join layer l's
               attention as extra keys/values (vlpre.llm's ExtraKV): every caption token
               sees every patch, nothing is fed at the LLM's input.
  mode="sa"    the baseline cascade (LLaVA-style): the final ViT features through one
               projector (`proj_sa`), fed as N input embeddings before the caption.

Sequence: [BOS] + caption + EOS (the SmolLM2 tokenizer); every caption token and the EOS
is predicted (`lm` loss: outputs lm_logits / lm_targets / lm_weights). Staged training
(vlpre/stages.py) gives HIVE's three stages: projectors, then + LLM, then + ViT.

`caption_inputs` is what the captioning evaluator and the vlpre-captioner describer use
to generate from an image; `embed_image` / `embed_patches` serve the probes of the ViT.

Shape letters: B batch, N patches, R ViT blocks, Dv ViT width, D LLM width, L caption
tokens, G KV heads, K per-head dim, V vocabulary.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from vlpre import llm as llm_lib
from vlpre import methods
from vlpre.llm import rope
from vlpre.nn import layers
from vlpre.nn.vit import vit_from_config


class Projector(nn.Module):
  """LayerNorm → Linear → GELU → Linear: ViT features into the LLM width."""
  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BxNxDv):
    x = layers.layer_norm(self.dtype, name="norm")(x_BxNxDv)
    x = nn.Dense(self.features, dtype=self.dtype, name="fc1",
                 kernel_init=layers.dense_init(("embed", "mlp")),
                 bias_init=layers.dense_init(("mlp",), nn.initializers.zeros))(x)
    x = nn.gelu(x)
    return nn.Dense(self.features, dtype=self.dtype, name="fc2",
                    kernel_init=layers.dense_init(("mlp", "embed")),
                    bias_init=layers.dense_init(("embed",), nn.initializers.zeros))(x)


class ImageKV(nn.Module):
  """One ViT level → one LLM layer's extra keys/values (projector, K/V, QK-norm, 2D RoPE)."""
  llm_config: llm_lib.DecoderConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BxNxDv, grid: tuple[int, int]) -> llm_lib.ExtraKV:
    cfg = self.llm_config
    batch, n, _ = x_BxNxDv.shape
    h_BxNxD = Projector(cfg.hidden_size, self.dtype, name="projector")(x_BxNxDv)

    def kv(name):
      return nn.Dense(cfg.num_kv_heads * cfg.head_dim, use_bias=False, dtype=self.dtype, name=name,
                      kernel_init=layers.dense_init(("embed", "kv_heads_fused"), nn.initializers.normal(0.02)))(
                          h_BxNxD).reshape(batch, n, cfg.num_kv_heads, cfg.head_dim)

    k_BxNxGxK, v_BxNxGxK = kv("k_proj"), kv("v_proj")
    k_BxNxGxK = nn.RMSNorm(cfg.rms_norm_eps, dtype=self.dtype, name="k_norm",
                           scale_init=layers.norm_init())(k_BxNxGxK)
    q_scale_K = self.param("q_norm_scale", layers.norm_init(), (cfg.head_dim,))
    rows_N, cols_N = rope.grid_positions(*grid)
    k_BxNxGxK = rope.apply_rope_2d(k_BxNxGxK, jnp.broadcast_to(rows_N, (batch, n)),
                                   jnp.broadcast_to(cols_N, (batch, n)), cfg.rope_theta)
    return llm_lib.ExtraKV(k_BxSxGxK=k_BxNxGxK, v_BxSxGxK=v_BxNxGxK,
                           mask_BxS=jnp.ones((batch, n), bool),
                           q_norm_scale_BxK=jnp.broadcast_to(q_scale_K, (batch, cfg.head_dim)))


class Model(nn.Module):
  """ViT + LLM captioner; HIVE's hierarchical cross-attention or the SA cascade."""
  llm: llm_lib.Decoder
  image: dict[str, Any]
  pairs: tuple[tuple[int, int], ...] = ((3, 8), (6, 16), (9, 24), (12, 30))
  mode: str = "hive"
  bos_id: int = 1
  dtype: Any = jnp.float32

  def setup(self):
    if self.mode not in ("hive", "sa"):
      raise ValueError(f"HIVE mode must be 'hive' or 'sa', got {self.mode!r}")
    self.img = vit_from_config(self.image, self.dtype)
    depth, layers_ = self.img.depth, self.llm.config.num_layers
    for b, l in self.pairs:
      if not (1 <= b <= depth and 1 <= l <= layers_):
        raise ValueError(f"HIVE pair ViT block {b} → LLM layer {l} is out of range "
                         f"(ViT blocks 1..{depth}, LLM layers 1..{layers_})")
    if self.mode == "hive":
      self.image_kv = {f"{b}to{l}": ImageKV(self.llm.config, self.dtype, name=f"proj_{b}to{l}")
                       for b, l in self.pairs}
    else:
      self.proj_sa = Projector(self.llm.config.hidden_size, self.dtype)

  def _condition(self, image_BxHxWx3, train: bool = False) -> dict:
    """{"extra_kv": {layer: ExtraKV}} (hive; 0-based layers, as vlpre.llm counts them) or
    {"embeddings": [B, N, D]} (sa)."""
    encoded = self.img.encode(image_BxHxWx3, train=train, all_levels=self.mode == "hive")
    if self.mode == "sa":
      return {"embeddings": self.proj_sa(encoded["tokens"])}
    patch = self.img.patch_size
    grid = (image_BxHxWx3.shape[1] // patch, image_BxHxWx3.shape[2] // patch)
    blocks_RxBxNxDv = encoded["blocks"]
    return {"extra_kv": {l - 1: self.image_kv[f"{b}to{l}"](blocks_RxBxNxDv[b - 1], grid)
                         for b, l in self.pairs}}

  def caption_inputs(self, image_BxHxWx3) -> dict:
    """The captioning evaluator's inputs (vlpre/evaluators/captioning.py): the prompt
    [BOS] (hive) or N image placeholders + [BOS] (sa), with what conditions the LLM."""
    cond = self._condition(image_BxHxWx3)
    batch = image_BxHxWx3.shape[0]
    if self.mode == "hive":
      return {"prompt_ids": jnp.full((batch, 1), self.bos_id, jnp.int32), **cond}
    image_BxNxD = cond["embeddings"]
    n = image_BxNxD.shape[1]
    prompt_BxP = jnp.concatenate([jnp.zeros((batch, n), jnp.int32),
                                  jnp.full((batch, 1), self.bos_id, jnp.int32)], axis=1)
    return {"prompt_ids": prompt_BxP,
            "embeddings": jnp.concatenate([image_BxNxD, jnp.zeros_like(image_BxNxD[:, :1])], 1),
            "embeddings_mask": jnp.broadcast_to(jnp.arange(n + 1) < n, (batch, n + 1))}

  def __call__(self, batch, *, train: bool = False):
    text_BxL, mask_BxL = batch["text"], batch["text_mask"].astype(bool)
    cond = self._condition(batch["image"], train)
    bos_Bx1 = jnp.full((text_BxL.shape[0], 1), self.bos_id, text_BxL.dtype)
    tokens_BxT = jnp.concatenate([bos_Bx1, text_BxL], axis=1)  # T = L + 1
    segments_BxT = jnp.concatenate([jnp.ones_like(bos_Bx1), mask_BxL.astype(jnp.int32)], axis=1)
    if self.mode == "hive":
      out = self.llm(tokens_BxT, segments_BxT, extra_kv=cond["extra_kv"], return_logits=True,
                     deterministic=not train)
      logits_BxTxV = out.logits
    else:
      image_BxNxD = cond["embeddings"]
      n = image_BxNxD.shape[1]
      pad_BxN = jnp.zeros(image_BxNxD.shape[:2], tokens_BxT.dtype)
      embeddings = jnp.concatenate(
          [image_BxNxD, jnp.zeros((*tokens_BxT.shape, image_BxNxD.shape[-1]), image_BxNxD.dtype)], 1)
      out = self.llm(jnp.concatenate([pad_BxN, tokens_BxT], 1),
                     jnp.concatenate([jnp.ones_like(pad_BxN), segments_BxT], 1),
                     embeddings_BxLxD=embeddings,
                     embeddings_mask_BxL=jnp.arange(n + tokens_BxT.shape[1])[None] < n,
                     return_logits=True, deterministic=not train)
      logits_BxTxV = out.logits[:, n:]
    return {"lm_logits": logits_BxTxV[:, :-1], "lm_targets": text_BxL,
            "lm_weights": mask_BxL.astype(jnp.float32)}

  def embed_image(self, image, train: bool = False):
    del train
    tokens_BxNxDv = self.img.encode(image, all_levels=False)["tokens"].astype(jnp.float32)
    pooled_BxDv = tokens_BxNxDv.mean(axis=1)
    return {"zimg": pooled_BxDv, "pre_logits": pooled_BxDv}

  def embed_patches(self, image):
    """The ViT's final per-patch tokens [B, N, Dv], for attentive probes."""
    return self.img.encode(image, all_levels=False)["tokens"].astype(jnp.float32)


def load_llm(config) -> llm_lib.LLM:
  """The LLM `hive.llm` names; its tokenizer ends every caption with EOS."""
  return llm_lib.from_config(config.hive.llm, dtype=config.get("dtype", "float32"),
                             max_len=config.input.max_text_len, append_eos=True)


def build(config) -> methods.Built:
  smollm = load_llm(config)
  bos = config.hive.get("bos_id", -1)
  model = Model(llm=smollm.module, image=dict(config.model.image),
                pairs=tuple(tuple(p) for p in config.hive.pairs), mode=config.hive.mode,
                bos_id=int(smollm.hf_config.bos_token_id if bos < 0 else bos),
                dtype=jnp.dtype(config.get("dtype", "float32")))
  return methods.Built(model, pretrained={"llm": smollm.params}, llm=smollm)


def build_tokenizer(config) -> Any:
  return load_llm(config).tokenizer
