"""GPT4Image stage 1: a text description for every training image.

    python -m vlpre.describe --config=configs/gpt4image.py:tiny
    python -m vlpre.embed    --config=configs/gpt4image.py:tiny    # stage 2: embed them
    python -m vlpre.main     --config=configs/gpt4image.py:tiny --workdir=...   # stage 3

Writes to `config.describe.output_dir`:
  descriptions.jsonl  one {"key": <sample key>, "description": <text>} per line, every
                      training image covered (stage 2 reads it with `read_descriptions`);
  meta.json           the describer and its settings, written last with "complete": true.
A rerun with the same settings is a no-op; other settings into the same directory are
an error (nothing is silently overwritten).

Backends (`config.describe.backend`):
  precomputed        a JSONL of {"key", "description"} written elsewhere (the paper:
                     MiniGPT-4 over every training image), validated here: every training
                     key covered, descriptions non-empty UTF-8.
  llm-class-prompts  the packaged SmolLM2-135M-Instruct writes `per_class` varied visual
                     descriptions of each class from its NAME (chat prompt, temperature
                     sampling; autoregressive decoding with a KV cache on vlpre's decoder
                     weights); each image gets one of its class's descriptions, picked by a
                     hash of its key. The text target is then a function of the label only,
                     unlike the paper's per-image descriptions: see docs/gpt4image.md.
  vlpre-captioner    describing images with a vlpre captioning model (LCL / HIVE): not
                     available yet, raises NotImplementedError.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from typing import Any, Sequence

from absl import app
from absl import flags
from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import tqdm

BACKENDS = ("precomputed", "llm-class-prompts", "vlpre-captioner")

# The system turn of the chat prompt; short, because a 135M model follows short prompts best.
DEFAULT_SYSTEM = "You are a helpful assistant who describes what things look like in photos."
# User turns, cycled over a class's samples so its descriptions look at different aspects.
DEFAULT_PROMPTS = (
    "Describe in one sentence what a photo of a {} looks like: its shape, colors and "
    "surroundings.",
    "In one short sentence, describe the visual appearance of a {} in a photograph.",
    "Write one sentence describing a typical picture of a {} and where it is.",
    "Give a one-sentence visual description of a {}, as seen in a small color photo.",
)


# ------------------------------------------------------------------------------ settings


def _file_sha1(path: str) -> str:
  digest = hashlib.sha1()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      digest.update(chunk)
  return digest.hexdigest()


def describer_settings(config) -> dict[str, Any]:
  """What the descriptions depend on; a rerun with equal settings skips the work."""
  d = config.describe
  if d.backend not in BACKENDS:
    raise ValueError(f"describe.backend must be one of {BACKENDS}, got {d.backend!r}")
  settings: dict[str, Any] = {"backend": d.backend, "train": str(config.input.train)}
  if d.backend == "precomputed":
    if not d.get("precomputed"):
      raise ValueError("describe.backend='precomputed' needs describe.precomputed: a JSONL "
                       'of {"key": ..., "description": ...}')
    # The content, not the path, identifies the descriptions: a moved file still matches.
    settings.update(source=os.path.basename(d.precomputed), sha1=_file_sha1(d.precomputed))
  elif d.backend == "llm-class-prompts":
    settings.update(llm=d.llm, classnames=d.classnames, per_class=int(d.per_class),
                    max_new_tokens=int(d.max_new_tokens), temperature=float(d.temperature),
                    top_k=int(d.top_k), seed=int(d.seed), system=d.get("system") or DEFAULT_SYSTEM,
                    prompts=list(d.get("prompts") or DEFAULT_PROMPTS))
  return settings


def descriptions_file(config) -> str:
  return os.path.join(config.describe.output_dir, "descriptions.jsonl")


def describer_name(meta: dict[str, Any]) -> str:
  """A one-line name of the describer for tables and logs."""
  s = meta["settings"]
  if s["backend"] == "llm-class-prompts":
    return (f"{s['llm']} from class names ({s['per_class']} descriptions/class, "
            f"T={s['temperature']})")
  return f"precomputed ({s['source']})"


# ------------------------------------------------------------------------------ reading


def read_descriptions(path: str) -> dict[str, list[str]]:
  """key → [descriptions] from a JSONL of {"key", "description"} (a key may repeat).

  Raises ValueError naming the line for non-UTF-8 bytes, malformed JSON, a missing
  field or an empty description.
  """
  out: dict[str, list[str]] = {}
  problems = []
  with open(path, "rb") as f:
    for number, raw in enumerate(f, start=1):
      if not raw.strip():
        continue
      try:
        row = json.loads(raw.decode("utf-8"))
      except UnicodeDecodeError as e:
        problems.append(f"line {number}: not UTF-8 ({e})")
        continue
      except json.JSONDecodeError as e:
        problems.append(f"line {number}: not JSON ({e})")
        continue
      row = row if isinstance(row, dict) else {}
      key, text = row.get("key"), row.get("description")
      if not isinstance(key, str) or not key:
        problems.append(f"line {number}: no string 'key'")
      elif not isinstance(text, str) or not text.strip():
        problems.append(f"line {number} (key {key!r}): empty or missing 'description'")
      else:
        out.setdefault(key, []).append(text.strip())
  if problems:
    raise ValueError(f"{path}: {len(problems)} bad lines, e.g. " + "; ".join(problems[:5]))
  return out


def check_coverage(descriptions: dict[str, list[str]], keys: Sequence[str], path: str) -> None:
  missing = [k for k in keys if k not in descriptions]
  if missing:
    raise ValueError(f"{path}: {len(missing)} of {len(keys)} training images have no "
                     f"description, e.g. {missing[:5]}")


def training_samples(config) -> tuple[list[str], list[int | None]]:
  """Keys (in source order) and labels (None where a sample has no .cls) of the train split."""
  from vlpre import data  # pylint: disable=g-import-not-at-top
  source = data.make_source(config.input, labels=True, captions=False)
  keys, labels = [], []
  for i in range(len(source)):
    record = source[i]
    keys.append(record["__key__"])
    labels.append(int(record["cls"]) if "cls" in record else None)
  return keys, labels


# ------------------------------------------------------------------ generation (KV cache)


def _rope_rows(x_BxTxNxH: jax.Array, positions_BxT: jax.Array, inv_freq_Hhalf: np.ndarray):
  """RoPE at per-row positions (left-padded prompts), transformers' rotate_half layout."""
  angles_BxTxHhalf = (positions_BxT[..., None].astype(jnp.float32) *
                      inv_freq_Hhalf.astype(np.float32))
  angles_BxTxH = jnp.concatenate([angles_BxTxHhalf, angles_BxTxHhalf], axis=-1)
  cos, sin = jnp.cos(angles_BxTxH)[:, :, None], jnp.sin(angles_BxTxH)[:, :, None]
  half = x_BxTxNxH.shape[-1] // 2
  rotated = jnp.concatenate([-x_BxTxNxH[..., half:], x_BxTxNxH[..., :half]], axis=-1)
  return x_BxTxNxH * cos.astype(x_BxTxNxH.dtype) + rotated * sin.astype(x_BxTxNxH.dtype)


class CachedAttention(nn.Module):
  """vlpre's decoder attention (same parameter names) reading and writing a KV cache."""
  config: Any  # text_encoders.decoder.DecoderConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BxTxD, positions_BxT, cache_k_BxSxKxH, cache_v_BxSxKxH, start, mask_BxTxS):
    from vlpre.text_encoders import decoder  # pylint: disable=g-import-not-at-top
    cfg = self.config
    batch, steps, _ = x_BxTxD.shape
    dense = functools.partial(nn.Dense, dtype=self.dtype, param_dtype=jnp.float32)
    q_BxTxNH = dense(cfg.num_heads * cfg.head_dim, use_bias=cfg.qkv_bias, name="q_proj")(x_BxTxD)
    k_BxTxKH = dense(cfg.num_kv_heads * cfg.head_dim, use_bias=cfg.qkv_bias, name="k_proj")(x_BxTxD)
    v_BxTxKH = dense(cfg.num_kv_heads * cfg.head_dim, use_bias=cfg.qkv_bias, name="v_proj")(x_BxTxD)
    q_BxTxNxH = q_BxTxNH.reshape(batch, steps, cfg.num_heads, cfg.head_dim)
    k_BxTxKxH = k_BxTxKH.reshape(batch, steps, cfg.num_kv_heads, cfg.head_dim)
    v_BxTxKxH = v_BxTxKH.reshape(batch, steps, cfg.num_kv_heads, cfg.head_dim)
    if cfg.qk_norm:
      q_BxTxNxH = nn.RMSNorm(cfg.rms_norm_eps, dtype=self.dtype, name="q_norm")(q_BxTxNxH)
      k_BxTxKxH = nn.RMSNorm(cfg.rms_norm_eps, dtype=self.dtype, name="k_norm")(k_BxTxKxH)
    inv_freq = decoder.rope_inverse_frequencies(cfg)
    q_BxTxNxH = _rope_rows(q_BxTxNxH, positions_BxT, inv_freq)
    k_BxTxKxH = _rope_rows(k_BxTxKxH, positions_BxT, inv_freq)
    cache_k_BxSxKxH = jax.lax.dynamic_update_slice(
        cache_k_BxSxKxH, k_BxTxKxH.astype(cache_k_BxSxKxH.dtype), (0, start, 0, 0))
    cache_v_BxSxKxH = jax.lax.dynamic_update_slice(
        cache_v_BxSxKxH, v_BxTxKxH.astype(cache_v_BxSxKxH.dtype), (0, start, 0, 0))
    out_BxTxNxH = jax.nn.dot_product_attention(
        q_BxTxNxH, cache_k_BxSxKxH.astype(self.dtype), cache_v_BxSxKxH.astype(self.dtype),
        mask=mask_BxTxS[:, None], scale=cfg.head_dim**-0.5)
    out_BxTxNH = out_BxTxNxH.reshape(batch, steps, cfg.num_heads * cfg.head_dim)
    return (dense(cfg.hidden_size, use_bias=cfg.o_bias, name="o_proj")(out_BxTxNH),
            cache_k_BxSxKxH, cache_v_BxSxKxH)


class CachedBlock(nn.Module):
  """vlpre's pre-norm decoder block (same parameter names) around CachedAttention."""
  config: Any  # text_encoders.decoder.DecoderConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BxTxD, positions_BxT, cache_k, cache_v, start, mask_BxTxS):
    from vlpre.text_encoders import decoder  # pylint: disable=g-import-not-at-top
    cfg = self.config
    norm = functools.partial(nn.RMSNorm, cfg.rms_norm_eps, dtype=self.dtype)
    h_BxTxD, cache_k, cache_v = CachedAttention(cfg, self.dtype, name="self_attn")(
        norm(name="input_layernorm")(x_BxTxD), positions_BxT, cache_k, cache_v, start, mask_BxTxS)
    x_BxTxD = x_BxTxD + h_BxTxD
    x_BxTxD = x_BxTxD + decoder.SwiGLU(cfg, self.dtype, name="mlp")(
        norm(name="post_attention_layernorm")(x_BxTxD))
    return x_BxTxD, cache_k, cache_v


class CachedDecoderLM(nn.Module):
  """vlpre.text_encoders.decoder.DecoderLM with a KV cache and the tied LM head.

  Takes the DecoderLM parameter tree as is (`load_text_encoder(...).params["backbone"]`).
  `__call__(ids_BxT, cache, start, pad_B)` runs T new tokens at buffer slots
  start..start+T-1 and returns (next-token logits of the last one [B, V], cache).
  Prompts are LEFT-padded by `pad_B` slots so every row's next token lands in the same
  slot; RoPE positions are slot − pad, and pad slots are never attended to.
  """
  config: Any  # text_encoders.decoder.DecoderConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, ids_BxT, cache, start, pad_B):
    cfg = self.config
    if cfg.sliding_window is not None:
      raise NotImplementedError("generation with a sliding-window decoder (Mistral v0.1)")
    embed = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=self.dtype, param_dtype=jnp.float32,
                     name="embed_tokens")
    x_BxTxD = embed(ids_BxT)
    steps, slots = ids_BxT.shape[1], cache["k"][0].shape[1]
    slot_T = start + jnp.arange(steps)
    positions_BxT = slot_T[None, :] - pad_B[:, None]
    key_slot_1x1xS = jnp.arange(slots)[None, None, :]
    query_slot_1xTx1 = slot_T[None, :, None]
    # Causal over slots; pad slots hidden (a pad query sees itself so no row is empty).
    mask_BxTxS = (key_slot_1x1xS <= query_slot_1xTx1) & (
        (key_slot_1x1xS >= pad_B[:, None, None]) | (key_slot_1x1xS == query_slot_1xTx1))
    new_k, new_v = [], []
    for i in range(cfg.num_layers):
      x_BxTxD, k, v = CachedBlock(cfg, self.dtype, name=f"layers_{i}")(
          x_BxTxD, positions_BxT, cache["k"][i], cache["v"][i], start, mask_BxTxS)
      new_k.append(k)
      new_v.append(v)
    hidden_BxD = nn.RMSNorm(cfg.rms_norm_eps, dtype=self.dtype, name="norm")(x_BxTxD[:, -1])
    # Tied embeddings (SmolLM2): logits = hidden @ embed_tokens.T.
    logits_BxV = embed.attend(hidden_BxD).astype(jnp.float32)
    return logits_BxV, {"k": new_k, "v": new_v}


def empty_cache(config, batch: int, slots: int, dtype=jnp.float32) -> dict:
  shape = (batch, slots, config.num_kv_heads, config.head_dim)
  return {"k": [jnp.zeros(shape, dtype) for _ in range(config.num_layers)],
          "v": [jnp.zeros(shape, dtype) for _ in range(config.num_layers)]}


def sample_logits(rng: jax.Array, logits_BxV: jax.Array, temperature: float, top_k: int):
  """Temperature sampling among the top_k tokens (greedy when temperature == 0)."""
  if temperature <= 0:
    return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
  logits_BxV = logits_BxV / temperature
  if top_k:
    kth_Bx1 = jax.lax.top_k(logits_BxV, top_k)[0][:, -1:]
    logits_BxV = jnp.where(logits_BxV < kth_Bx1, -jnp.inf, logits_BxV)
  return jax.random.categorical(rng, logits_BxV).astype(jnp.int32)


def chat_prompt(user: str, system: str) -> str:
  """ChatML, the chat format of SmolLM2 (and Qwen) instruct models, ready for the answer."""
  return (f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n"
          "<|im_start|>assistant\n")


@functools.lru_cache(maxsize=2)
def load_llm(name: str):
  """The packaged LLM's weights, tokenizer and architecture (through the public loader)."""
  from vlpre import text_encoders  # pylint: disable=g-import-not-at-top
  from vlpre.text_encoders import decoder  # pylint: disable=g-import-not-at-top
  encoder = text_encoders.load_text_encoder(name, max_len=8, normalize=False)
  hf = encoder.hf_config
  if hf.model_type not in decoder.SUPPORTED_MODEL_TYPES:
    raise ValueError(f"{name!r} is a {hf.model_type} model, not a decoder LLM that can generate")
  if not getattr(hf, "tie_word_embeddings", False):
    # The loaders drop lm_head.weight (an encoder never needs it), so only tied models work.
    raise NotImplementedError(f"{name!r} has an untied LM head; generation needs tied embeddings")
  return encoder, decoder.DecoderConfig.from_hf(hf)


def generate(llm_name: str, prompts: Sequence[str], *, samples_per_prompt: int,
             max_new_tokens: int, temperature: float, top_k: int, seed: int,
             progress: bool = True) -> list[list[str]]:
  """`samples_per_prompt` completions of each (already chat-formatted) prompt.

  Each distinct prompt is prefilled once, its cache copied to its samples, then every
  row decodes one token per jitted step until all rows ended or `max_new_tokens`.

  Returns:
    For each prompt, its completions (decoded, special tokens dropped, stripped).
  """
  encoder, cfg = load_llm(llm_name)
  tokenizer = encoder.tokenizer
  params = {"params": encoder.params["backbone"]}
  model = CachedDecoderLM(cfg)
  stop_ids = {i for i in (tokenizer.eos_id, encoder.hf_config.eos_token_id,
                          tokenizer.backend.token_to_id("<|endoftext|>")) if i is not None}
  prompt_ids = [tokenizer.backend.encode(p, add_special_tokens=False).ids for p in prompts]
  width = max(len(ids) for ids in prompt_ids)
  pad_U = np.array([width - len(ids) for ids in prompt_ids], np.int32)
  ids_UxP = np.full((len(prompts), width), tokenizer.pad_id, np.int32)
  for row, ids in enumerate(prompt_ids):
    ids_UxP[row, pad_U[row]:] = ids
  slots = width + max_new_tokens

  run = jax.jit(model.apply, donate_argnums=(2,))
  logits_UxV, cache = run(params, jnp.asarray(ids_UxP), empty_cache(cfg, len(prompts), slots),
                          jnp.int32(0), jnp.asarray(pad_U))
  repeat = functools.partial(jnp.repeat, repeats=samples_per_prompt, axis=0)
  cache = jax.tree.map(repeat, cache)
  logits_BxV, pad_B = repeat(logits_UxV), repeat(jnp.asarray(pad_U))
  sample = jax.jit(functools.partial(sample_logits, temperature=temperature, top_k=top_k))
  rng = jax.random.key(seed)
  batch = logits_BxV.shape[0]
  tokens = np.zeros((batch, max_new_tokens), np.int32)
  done_B = np.zeros(batch, bool)
  for t in tqdm.trange(max_new_tokens, disable=not progress, desc="generating", leave=False):
    next_B = np.asarray(sample(jax.random.fold_in(rng, t), logits_BxV))
    tokens[:, t] = np.where(done_B, tokenizer.pad_id, next_B)
    done_B |= np.isin(next_B, list(stop_ids))
    if done_B.all() or t == max_new_tokens - 1:
      break
    logits_BxV, cache = run(params, jnp.asarray(next_B[:, None]), cache, jnp.int32(width + t),
                            pad_B)
  texts = []
  for row in tokens:
    end = next((i for i, tok in enumerate(row) if tok in stop_ids), len(row))
    texts.append(tokenizer.decode(row[:end], skip_special_tokens=True))
  return [texts[i * samples_per_prompt:(i + 1) * samples_per_prompt] for i in range(len(prompts))]


def clean_description(text: str) -> str:
  """One line; a completion cut off by the token limit ends at its last full sentence."""
  text = " ".join(text.replace("*", " ").split()).strip().strip('"').strip()
  if text and text[-1] not in ".!?":
    cut = max(text.rfind(". "), text.rfind("! "), text.rfind("? "))
    if cut > 0:
      text = text[:cut + 1]
  return text


def class_descriptions(settings: dict[str, Any], classnames: Sequence[str], *,
                       progress: bool = True, max_rounds: int = 4) -> list[list[str]]:
  """`per_class` distinct, non-empty descriptions of each class, from its name alone.

  Sample j of a class uses prompt j mod len(prompts). Rows whose completion is empty
  or repeats an earlier one are resampled (another seed), up to `max_rounds` times.
  """
  per_class, prompts = settings["per_class"], settings["prompts"]
  result: list[list[str | None]] = [[None] * per_class for _ in classnames]
  for round_ in range(max_rounds):
    todo = [(c, j) for c in range(len(classnames)) for j in range(per_class)
            if result[c][j] is None]
    if not todo:
      break
    # One prompt per (class, template); a row per missing sample of it.
    wanted: dict[tuple[int, int], list[int]] = {}
    for c, j in todo:
      wanted.setdefault((c, j % len(prompts)), []).append(j)
    groups = sorted(wanted)
    samples = max(len(v) for v in wanted.values())
    texts = generate(settings["llm"],
                     [chat_prompt(prompts[p].format(classnames[c]), settings["system"])
                      for c, p in groups],
                     samples_per_prompt=samples, max_new_tokens=settings["max_new_tokens"],
                     temperature=settings["temperature"], top_k=settings["top_k"],
                     seed=settings["seed"] + 1000 * round_, progress=progress)
    for (c, _), slots, outs in zip(groups, (wanted[g] for g in groups), texts):
      for j, text in zip(slots, outs):
        text = clean_description(text)
        if text and text not in result[c]:
          result[c][j] = text
  missing = [(classnames[c], j) for c in range(len(classnames)) for j in range(per_class)
             if result[c][j] is None]
  if missing:
    raise RuntimeError(f"no usable description after {max_rounds} rounds for {missing[:5]}; "
                       "raise describe.max_new_tokens or describe.temperature")
  return result  # type: ignore[return-value]


def pick(key: str, count: int, seed: int) -> int:
  """Which of `count` descriptions an image gets: a stable hash of its key."""
  return int(hashlib.sha1(f"{seed}:{key}".encode()).hexdigest(), 16) % count


# ---------------------------------------------------------------------------------- run


def _write_atomic(path: str, lines: Sequence[str]) -> None:
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    f.writelines(lines)
  os.replace(path + ".tmp", path)


def describe(config, *, progress: bool = True) -> str:
  """Runs stage 1 for `config` and returns the path of descriptions.jsonl (resumable)."""
  settings = describer_settings(config)
  if settings["backend"] == "vlpre-captioner":
    raise NotImplementedError(
        "describe.backend='vlpre-captioner' needs a vlpre image-captioning model, and none "
        "exists yet: LCL and HIVE (docs/METHODS.md) are not implemented in vlpre. Describe the "
        "images with an external multimodal LLM (the paper: MiniGPT-4) and use "
        "backend='precomputed', or use backend='llm-class-prompts'.")
  out_dir = config.describe.output_dir
  meta_path = os.path.join(out_dir, "meta.json")
  path = descriptions_file(config)
  if os.path.exists(meta_path):  # written last: it exists only for a complete output
    with open(meta_path, encoding="utf-8") as f:
      old = json.load(f)
    if old["settings"] != settings:
      raise ValueError(f"{out_dir} holds descriptions made with {old['settings']}; the config "
                       f"asks for {settings}. Point describe.output_dir elsewhere.")
    if os.path.exists(path):
      logging.info("descriptions complete in %s (%s): nothing to do", out_dir, old["describer"])
      return path
  os.makedirs(out_dir, exist_ok=True)
  keys, labels = training_samples(config)
  extra: dict[str, Any] = {}
  if settings["backend"] == "precomputed":
    source = config.describe.precomputed
    table = read_descriptions(source)
    check_coverage(table, keys, source)
    rows = [(k, text) for k in keys for text in table[k]]
  else:
    per_class, classnames = _class_descriptions_cached(config, settings, labels, keys, progress)
    extra["class_descriptions"] = dict(zip(classnames, per_class))
    rows = [(k, per_class[y][pick(k, settings["per_class"], settings["seed"])])
            for k, y in zip(keys, labels)]

  _write_atomic(path, [json.dumps({"key": k, "description": text}, ensure_ascii=False) + "\n"
                       for k, text in tqdm.tqdm(rows, disable=not progress, desc="writing")])
  meta = {"settings": settings, "complete": True, "num_images": len(keys),
          "num_descriptions": len(rows), **extra}
  meta["describer"] = describer_name(meta)
  _write_atomic(meta_path, [json.dumps(meta, indent=1, ensure_ascii=False)])
  logging.info("wrote %d descriptions of %d images to %s (%s)", len(rows), len(keys), path,
               meta["describer"])
  return path


def _class_descriptions_cached(config, settings, labels, keys, progress):
  """class_descriptions, saved beside the output so an interrupted run does not regenerate."""
  from vlpre import data  # pylint: disable=g-import-not-at-top
  classnames = data.load_classnames(settings["classnames"], data_dir=config.input.get("data_dir"))
  unlabeled = [k for k, y in zip(keys, labels) if y is None or not 0 <= y < len(classnames)]
  if unlabeled:
    raise ValueError(f"llm-class-prompts needs a class label (.cls) in [0, {len(classnames)}) "
                     f"for every image; {len(unlabeled)} lack one, e.g. {unlabeled[:5]}")
  cache_path = os.path.join(config.describe.output_dir, "class_descriptions.json")
  if os.path.exists(cache_path):
    with open(cache_path, encoding="utf-8") as f:
      cached = json.load(f)
    if cached["settings"] == settings and cached["classnames"] == classnames:
      return cached["descriptions"], classnames
  per_class = class_descriptions(settings, classnames, progress=progress)
  _write_atomic(cache_path, [json.dumps({"settings": settings, "classnames": classnames,
                                         "descriptions": per_class}, indent=1, ensure_ascii=False)])
  return per_class, classnames


_CONFIG = None


def main(argv):
  del argv
  logging.set_verbosity(logging.INFO)
  describe(_CONFIG.value)


if __name__ == "__main__":
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  _CONFIG = config_flags.DEFINE_config_file("config", None, "A GPT4Image config.")
  flags.mark_flags_as_required(["config"])
  app.run(main)
