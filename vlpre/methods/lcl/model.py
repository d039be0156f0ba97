"""LCL: Latent Compression Learning on interleaved image-text data (arXiv 2406.07543).

A ViT trained from scratch and a causal model read packed interleaved rows
(data.py beside this file: text tokens, and per image `<soi>` + P placeholders + `<eoi>`).
The ViT (pool="map", no CLS) gives each image slot
  - a global latent: the attention pool's one learnable query (layers.MapHead) →
    `img_proj` → image_latent_BxMxE, L_con's image side;
  - P visual tokens: the same block's value/out projections per patch (`patch_latents`)
    → `visual_proj` to the causal model's width, written over the placeholders at
    `visual_positions` (one scatter into the decoder's input embeddings).
The causal model is vlpre.llm's Decoder (`llm`), either
  (a) small and trained from scratch on the CLIP BPE vocabulary + the 3 special tokens
      (placeholder, soi, eoi = vocab_size + 0/1/2, rows of its own table): the paper; or
  (b) the packaged SmolLM2 (`lcl.llm.name="smollm2-135m"`, beyond the paper): its token table
      stays as loaded, and the 3 special tokens get their own learned rows
      (`special_embed` [3, D]) fed through the decoder's embeddings input; their logits
      are `hidden @ special_embed.T`, appended after the LLM's, as a grown tied table
      would give (so every id of a row, specials included, is a valid target index).
The decoder's output at each `<soi>` (final norm applied by the decoder) → `txt_proj` is
soi_embedding_BxMxE, L_con's text side; its logits serve L_gen (losses.py here).

Evaluators: `embed_image` (zimg = projected global latent, pre_logits = the latent);
`embed_patches` = the ViT's final per-patch tokens (as every other method's, so probes
compare encoders alike; not the visual tokens); `embed_text` = the paper's retrieval, the
caption followed by `<soi>` through the causal model, projected and normalised there;
`caption_inputs` = `<soi>` + the image's visual tokens + `<eoi>`, the caption decoded
after `<eoi>` as image-first paired documents are trained.

Shape letters: B rows, L positions, M image slots per row, P visual tokens per image
(= the ViT's N patches), I = B·M images, Dv ViT width, D decoder width, E embedding dim,
V vocabulary (with the special tokens).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from vlpre import llm as llm_lib
from vlpre import methods
from vlpre.data import tokenizers
from vlpre.losses import l2_normalize
from vlpre.methods.lcl import data as lcl_data
from vlpre.nn import layers
from vlpre.nn.vit import vit_from_config


class Model(nn.Module):
  """ViT (attention-pooled) + causal decoder over interleaved rows; outputs for both losses.

  Attributes:
    llm: the causal Decoder (from scratch or pretrained; see the module docstring).
    image: ViT keyword arguments (vit_from_config); pool must be "map".
    image_token_ids: (placeholder, soi, eoi) as the input pipeline writes them.
    wrapper_ids: the tokenizer's `special_ids` (its start/end ids), which `embed_text`
      drops from a caption (training text carries none before an image's `<soi>`).
    embed_dim: E, the contrastive space.
  """
  llm: llm_lib.Decoder
  image: dict[str, Any]
  image_token_ids: tuple[int, int, int]
  wrapper_ids: tuple[int, ...] = ()
  embed_dim: int = 256
  logit_scale_init: float = float(np.log(1 / 0.07))
  max_logit_scale: float = 100.0
  dtype: Any = jnp.float32

  def setup(self):
    if self.image.get("pool") != "map":
      raise ValueError(f"LCL's ViT pools with attention: image.pool must be 'map', "
                       f"got {self.image.get('pool')!r}")
    self.img = vit_from_config(self.image, self.dtype)
    width, vocab = self.llm.config.hidden_size, self.llm.config.vocab_size
    self.visual_proj = nn.Dense(width, dtype=self.dtype,
                                kernel_init=layers.dense_init(("embed", None)),
                                bias_init=layers.dense_init((None,), nn.initializers.zeros))
    self.img_proj = nn.Dense(self.embed_dim, use_bias=False, dtype=self.dtype,
                             kernel_init=layers.dense_init(("embed", None)))
    self.txt_proj = nn.Dense(self.embed_dim, use_bias=False, dtype=self.dtype,
                             kernel_init=layers.dense_init(("embed", None)))
    self.t_prime = self.param("t_prime", nn.initializers.constant(self.logit_scale_init), ())
    outside = [i >= vocab for i in self.image_token_ids]
    self.separate_specials = all(outside)
    if any(outside) and not self.separate_specials:
      raise ValueError(f"image token ids {self.image_token_ids}: all inside the decoder's "
                       f"{vocab} rows or all after them")
    if self.separate_specials:
      if sorted(self.image_token_ids) != list(range(vocab, vocab + 3)):
        raise ValueError(f"image token ids {self.image_token_ids} must be {vocab}, {vocab + 1}, "
                         f"{vocab + 2}: the rows after the pretrained table")
      self.special_embed = self.param(
          "special_embed", layers.dense_init((None, "embed"), nn.initializers.normal(0.02)),
          (3, width))

  # ---------------------------------------------------------------- the causal model

  def _token_inputs(self, tokens_BxL):
    """(ids the decoder's table holds, embeddings_BxLxD, embeddings_mask_BxL) of `tokens`.

    (a): the ids as they are, no embeddings yet. (b): special ids become 0 in the table
    lookup and take their `special_embed` rows through the embeddings input.
    """
    tokens_BxL = jnp.asarray(tokens_BxL)
    batch, length = tokens_BxL.shape
    width = self.llm.config.hidden_size
    if not self.separate_specials:
      return (tokens_BxL, jnp.zeros((batch, length, width), self.dtype),
              jnp.zeros((batch, length), bool))
    vocab = self.llm.config.vocab_size
    special_BxL = tokens_BxL >= vocab
    rows_BxL = jnp.clip(tokens_BxL - vocab, 0, 2)
    embeddings_BxLxD = jnp.where(special_BxL[..., None],
                                 self.special_embed.astype(self.dtype)[rows_BxL], 0.0)
    return jnp.where(special_BxL, 0, tokens_BxL), embeddings_BxLxD, special_BxL

  def _decode(self, tokens_BxL, segment_ids_BxL, positions_BxL, visual_BxMxPxD=None,
              visual_positions_BxMxP=None, *, logits: bool = False, train: bool = False):
    """(hidden_BxLxD after the final norm, logits_BxLxV or None): V includes the special
    columns in (b), so every id of a row is a valid index of the logits."""
    ids_BxL, embeddings_BxLxD, mask_BxL = self.decoder_inputs(
        tokens_BxL, visual_BxMxPxD, visual_positions_BxMxP)
    out = self.llm(ids_BxL, segment_ids_BxL, embeddings_BxLxD=embeddings_BxLxD,
                   embeddings_mask_BxL=mask_BxL, positions_BxL=positions_BxL,
                   return_logits=logits, deterministic=not train)
    logits_BxLxV = out.logits
    if logits and self.separate_specials:
      special_BxLx3 = jnp.einsum("bld,sd->bls", out.hidden.astype(jnp.float32),
                                 self.special_embed.astype(jnp.float32))
      logits_BxLxV = jnp.concatenate([logits_BxLxV, special_BxLx3], axis=-1)
    return out.hidden, logits_BxLxV

  def decoder_inputs(self, tokens_BxL, visual_BxMxPxD=None, visual_positions_BxMxP=None):
    """What the decoder reads: (ids, embeddings_BxLxD, embeddings_mask_BxL), the visual
    tokens scattered to `visual_positions` (L, an empty slot's position, is dropped)."""
    ids_BxL, embeddings_BxLxD, mask_BxL = self._token_inputs(tokens_BxL)
    if visual_BxMxPxD is not None:
      rows_Bx1x1 = jnp.arange(tokens_BxL.shape[0])[:, None, None]
      embeddings_BxLxD = embeddings_BxLxD.at[rows_Bx1x1, visual_positions_BxMxP].set(
          visual_BxMxPxD.astype(self.dtype), mode="drop")
      mask_BxL = mask_BxL.at[rows_Bx1x1, visual_positions_BxMxP].set(True, mode="drop")
    return ids_BxL, embeddings_BxLxD, mask_BxL

  # ---------------------------------------------------------------------- the images

  def _encode_images(self, images_IxHxWx3, train: bool = False):
    """(global latents [I, Dv], visual tokens [I, P, D])."""
    encoded = self.img.encode(images_IxHxWx3, train=train, all_levels=True)
    return encoded["pooled"], self.visual_proj(encoded["patch_latents"])

  def __call__(self, batch, *, train: bool = False):
    tokens_BxL, images_BxMxHxWx3 = batch["tokens"], batch["images"]
    batch_size, slots = images_BxMxHxWx3.shape[:2]
    visual_positions_BxMxP = batch["visual_positions"]
    latent_IxDv, visual_IxPxD = self._encode_images(
        images_BxMxHxWx3.reshape(-1, *images_BxMxHxWx3.shape[2:]), train)
    if visual_IxPxD.shape[1] != visual_positions_BxMxP.shape[-1]:
      raise ValueError(f"the ViT gives {visual_IxPxD.shape[1]} visual tokens per image, the "
                       f"input reserves {visual_positions_BxMxP.shape[-1]} (input.visual_tokens)")
    visual_BxMxPxD = visual_IxPxD.reshape(batch_size, slots, *visual_IxPxD.shape[1:])
    hidden_BxLxD, logits_BxLxV = self._decode(
        tokens_BxL, batch["segment_ids"], batch["positions"], visual_BxMxPxD,
        visual_positions_BxMxP, logits=True, train=train)
    soi_BxMxD = jnp.take_along_axis(hidden_BxLxD, batch["soi_positions"][..., None], axis=1)
    latent_BxMxDv = latent_IxDv.reshape(batch_size, slots, -1)
    return {"soi_embedding_BxMxE": self.txt_proj(soi_BxMxD).astype(jnp.float32),
            "image_latent_BxMxE": self.img_proj(latent_BxMxDv).astype(jnp.float32),
            "image_valid_BxM": batch["image_valid"].astype(bool),
            "logit_scale": jnp.exp(jnp.minimum(self.t_prime, jnp.log(self.max_logit_scale))),
            "logits_BxLxV": logits_BxLxV}

  # ------------------------------------------------------------------ the evaluators

  def embed_image(self, image, train: bool = False):
    pooled_BxDv, _ = self.img(image, train=train)
    return {"zimg": self.img_proj(pooled_BxDv).astype(jnp.float32),
            "pre_logits": pooled_BxDv.astype(jnp.float32)}

  def embed_patches(self, image):
    """The ViT's final per-patch tokens [B, N, Dv] (what other methods' probes read)."""
    return self.img.encode(image, all_levels=False)["tokens"].astype(jnp.float32)

  def embed_text(self, text, text_mask=None, train: bool = False):
    """Caption + `<soi>` through the causal model → `txt_proj`, l2-normalised, [B, E].

    The tokenizer's start/end tokens (`wrapper_ids`) and padding get segment 0, which no
    real token attends to, and the text keeps positions 0..n-1: the same as the compact
    row [caption, <soi>] of a text-first paired document.
    """
    keep_BxL = jnp.ones(text.shape, bool) if text_mask is None else text_mask.astype(bool)
    keep_BxL &= ~jnp.isin(text, jnp.asarray(self.wrapper_ids or (-1,), text.dtype))
    positions_BxL = jnp.maximum(jnp.cumsum(keep_BxL, axis=1) - 1, 0)
    soi_Bx1 = jnp.full((text.shape[0], 1), self.image_token_ids[1], text.dtype)
    hidden_BxLxD, _ = self._decode(
        jnp.concatenate([text, soi_Bx1], 1),
        jnp.concatenate([keep_BxL, jnp.ones_like(soi_Bx1, bool)], 1).astype(jnp.int32),
        jnp.concatenate([positions_BxL, keep_BxL.sum(1, keepdims=True)], 1), train=train)
    return l2_normalize(self.txt_proj(hidden_BxLxD[:, -1]).astype(jnp.float32))

  def caption_inputs(self, image_BxHxWx3) -> dict:
    """The captioning evaluator's prompt: `<soi>` + P visual tokens + `<eoi>` [B, P + 2].

    Embeddings cover the visual tokens (and, in (b), the special tokens, whose prompt ids
    are then 0: the generator feeds the ids to the decoder's own table).
    """
    placeholder, soi, eoi = self.image_token_ids
    _, visual_BxPxD = self._encode_images(image_BxHxWx3)
    batch, num_visual = visual_BxPxD.shape[:2]
    prompt_T = jnp.asarray([soi] + [placeholder] * num_visual + [eoi], jnp.int32)
    prompt_BxT = jnp.broadcast_to(prompt_T, (batch, num_visual + 2))
    visual_positions_Bx1xP = jnp.broadcast_to(1 + jnp.arange(num_visual), (batch, 1, num_visual))
    ids_BxT, embeddings_BxTxD, mask_BxT = self.decoder_inputs(
        prompt_BxT, visual_BxPxD[:, None], visual_positions_Bx1xP)
    return {"prompt_ids": ids_BxT, "embeddings": embeddings_BxTxD, "embeddings_mask": mask_BxT}


# --------------------------------------------------------------------------- building


def load_llm(config) -> llm_lib.LLM:
  """(b): the pretrained LLM `lcl.llm` names (its `num_layers`: the first N layers)."""
  return llm_lib.from_config(config.lcl.llm, dtype=config.get("dtype", "float32"),
                             append_eos=True)


def decoder_config(decoder: dict, vocab_size: int) -> llm_lib.DecoderConfig:
  """(a): the from-scratch causal model (Llama-style blocks, RoPE, tied LM head)."""
  width, heads = int(decoder["width"]), int(decoder["num_heads"])
  if width % heads:
    raise ValueError(f"decoder width {width} is not divisible by {heads} heads")
  return llm_lib.DecoderConfig(
      vocab_size=vocab_size, hidden_size=width, intermediate_size=int(decoder["mlp_dim"]),
      num_layers=int(decoder["depth"]), num_heads=heads, num_kv_heads=heads,
      head_dim=width // heads, rope_theta=float(decoder.get("rope_theta", 10_000.0)))


def build(config) -> methods.Built:
  c, dtype = config.lcl, config.get("dtype", "float32")
  tokenizer = build_tokenizer(config)
  token_ids = tuple(int(i) for i in lcl_data.image_token_ids(config.input, tokenizer))
  if c.llm.name:
    llm = load_llm(config)
    decoder, pretrained = llm.module, {"llm": llm.params}
  else:
    vocab_size = max(tokenizer.vocab_size, max(token_ids) + 1)
    decoder_cfg = decoder_config(dict(c.decoder), vocab_size)
    decoder = llm_lib.Decoder(decoder_cfg, **llm_lib.decoder_options(c.llm, dtype=dtype))
    # An LLM with no weights of its own: the generator reads the trained ones (`params`).
    # The CLIP tokenizer decodes as the generator needs: the 3 special ids after its
    # vocabulary have no text, and <end_of_text> is its EOS.
    llm = llm_lib.LLM(name="lcl-scratch", module=decoder, params=None, tokenizer=tokenizer,
                      config=decoder_cfg, hf_config=None)
    pretrained = None
  model = Model(llm=decoder, image=dict(config.model.image), image_token_ids=token_ids,
                wrapper_ids=tuple(sorted(tokenizer.special_ids)), embed_dim=int(c.embed_dim),
                dtype=jnp.dtype(dtype))
  return methods.Built(model, pretrained=pretrained, llm=llm)


def input_extras(config) -> methods.InputExtras:
  """Interleaved documents (and pairs wrapped as documents), tokenized and packed into rows
  by the method itself (data.py)."""
  del config
  return methods.InputExtras(records=lcl_data.train_records)


def build_tokenizer(config) -> Any:
  """(a): the CLIP BPE tokenizer; (b): the LLM's own."""
  if config.lcl.llm.name:
    return load_llm(config).tokenizer
  return tokenizers.get_tokenizer("clip_bpe")
