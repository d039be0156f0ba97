"""Autoregressive decoding on vlpre's decoder with its KV cache.

    outputs = generate(llm, prompt_ids, max_new_tokens=20)                  # greedy
    outputs = generate(llm, prompt_ids, max_new_tokens=20, temperature=0.8, top_k=50,
                       num_samples=4, seed=0)                                 # sampling
    outputs = generate(llm, prompt_ids, max_new_tokens=20, beam_width=4)     # beam search

Prompts are LEFT-padded to one width so every row's next token lands in the same cache
slot; padding has segment id 0 (never attended to) and RoPE positions count real tokens
only, so a padded prompt decodes exactly as it would alone. Each distinct prompt is
prefilled once and its cache copied to its samples / beams; then one jitted step per
token, until every row has stopped or `max_new_tokens`.

`embeddings` / `extra_kv` let a captioning model condition the prompt on an image (image
tokens at the prompt's start, or keys/values added to chosen layers); they are passed
to the prefill, and extra keys/values to every step as well.

Shape letters: U distinct prompts, B rows (U × samples or U × beams), P prompt width,
S cache slots, V vocabulary, W beam width.
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vlpre.llm.model import ExtraKV


def sample_logits(rng: jax.Array, logits_BxV: jax.Array, temperature: float,
                  top_k: int) -> jax.Array:
  """Temperature sampling among the top_k tokens (greedy when temperature == 0)."""
  if temperature <= 0:
    return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
  logits_BxV = logits_BxV / temperature
  if top_k:
    kth_Bx1 = jax.lax.top_k(logits_BxV, top_k)[0][:, -1:]
    logits_BxV = jnp.where(logits_BxV < kth_Bx1, -jnp.inf, logits_BxV)
  return jax.random.categorical(rng, logits_BxV).astype(jnp.int32)


def _left_pad(prompt_ids: Sequence[Sequence[int]], pad_id: int):
  width = max(len(ids) for ids in prompt_ids)
  if min(len(ids) for ids in prompt_ids) == 0:
    raise ValueError("every prompt needs at least one token")
  ids_UxP = np.full((len(prompt_ids), width), pad_id, np.int32)
  segments_UxP = np.zeros((len(prompt_ids), width), np.int32)
  for row, ids in enumerate(prompt_ids):
    ids_UxP[row, width - len(ids):] = ids
    segments_UxP[row, width - len(ids):] = 1
  positions_UxP = np.maximum(np.cumsum(segments_UxP, axis=1) - 1, 0).astype(np.int32)
  return ids_UxP, segments_UxP, positions_UxP


def _repeat_rows(tree: Any, repeats: int) -> Any:
  """Each batch row `repeats` times (cache arrays keep their layer axis in front)."""
  def rep(x):
    if x.ndim == 0:
      return x
    axis = 1 if x.ndim == 5 else 0  # cache k/v: [layers, B, S, K, H]
    return jnp.repeat(x, repeats, axis=axis)
  return jax.tree.map(rep, tree)


def _take_rows(tree: Any, rows_B: jax.Array) -> Any:
  def take(x):
    if x.ndim == 0:
      return x
    return jnp.take(x, rows_B, axis=1 if x.ndim == 5 else 0)
  return jax.tree.map(take, tree)


# One jitted step function per decoder module (kept alive here, so its id stays unique):
# repeated `generate` calls, e.g. an evaluator's batches, compile once per input shape.
_STEP_FNS: dict[int, tuple[Any, Callable]] = {}


def _step_fn(module) -> Callable:
  if id(module) not in _STEP_FNS:
    def run(variables, tokens, segments, positions, cache, embeddings, embeddings_mask, extra):
      out = module.apply(variables, tokens, segments, positions_BxL=positions, cache=cache,
                         embeddings_BxLxD=embeddings, embeddings_mask_BxL=embeddings_mask,
                         extra_kv=extra, return_logits="last")
      return out.logits[:, -1], out.cache

    _STEP_FNS[id(module)] = (module, jax.jit(run, donate_argnums=(4,)))
  return _STEP_FNS[id(module)][1]


class _Runner:
  """The jitted prefill and step functions of one decoder and parameter set."""

  def __init__(self, llm, params):
    self.llm = llm
    self.variables = {"params": params}
    self.run = _step_fn(llm.module)

  def __call__(self, tokens, segments, positions, cache, embeddings=None, embeddings_mask=None,
               extra=None):
    return self.run(self.variables, jnp.asarray(tokens), jnp.asarray(segments),
                    jnp.asarray(positions), cache, embeddings, embeddings_mask, extra)


def _prefill(llm, runner, prompt_ids, max_new_tokens, repeats, embeddings, embeddings_mask,
             extra_kv):
  ids_UxP, segments_UxP, positions_UxP = _left_pad(prompt_ids, llm.tokenizer.pad_id)
  width = ids_UxP.shape[1]
  if embeddings is not None and embeddings.shape[1] != width:
    raise ValueError(f"embeddings cover {embeddings.shape[1]} positions; the left-padded "
                     f"prompts are {width} wide")
  cache = llm.init_cache(len(prompt_ids), width + max_new_tokens)
  logits_UxV, cache = runner(ids_UxP, segments_UxP, positions_UxP, cache, embeddings,
                             embeddings_mask, extra_kv)
  next_position_U = positions_UxP[:, -1] + 1
  logits_BxV, cache = _repeat_rows((logits_UxV, cache), repeats)
  extra_B = None if extra_kv is None else _repeat_rows(dict(extra_kv), repeats)
  return logits_BxV, cache, np.repeat(next_position_U, repeats), extra_B


def generate(llm, prompt_ids: Sequence[Sequence[int]], *, max_new_tokens: int,
             temperature: float = 0.0, top_k: int = 0, num_samples: int = 1, seed: int = 0,
             beam_width: int = 0, length_penalty: float = 1.0,
             stop_ids: Sequence[int] | None = None, params: Any = None,
             embeddings: jax.Array | None = None, embeddings_mask: jax.Array | None = None,
             extra_kv: Mapping[int, ExtraKV] | None = None,
             progress: Callable[[int], None] | None = None) -> list[list[list[int]]]:
  """Continues each prompt.

  Args:
    llm: a `vlpre.llm.LLM` (module, tokenizer, config).
    prompt_ids: U token-id lists (already templated, e.g. a chat prompt).
    max_new_tokens: most tokens generated per row.
    temperature, top_k: sampling (temperature 0: greedy).
    num_samples: completions per prompt (sampling).
    seed: the sampling seed (token t of every row uses fold_in(seed, t)).
    beam_width: > 0 runs beam search instead (deterministic; num_samples ignored); the
      best beam of each prompt by log-probability / length**length_penalty.
    stop_ids: tokens that end a row (default: `llm.stop_ids()`); kept out of the output.
    params: parameters to use instead of `llm.params` (e.g. a trained model's).
    embeddings, embeddings_mask: [U, P, D] / [U, P] input embeddings of the prompt
      positions (left-padded layout: the prompt's last token at position P-1).
    extra_kv: {layer: ExtraKV} with U rows, added to those layers at every step.
    progress: called with each step number.

  Returns:
    For each prompt, its completions' token ids (num_samples of them; 1 for beam search).
  """
  stop = set(llm.stop_ids() if stop_ids is None else stop_ids)
  runner = _Runner(llm, llm.params if params is None else params)
  if beam_width > 0:
    return _beam_search(llm, runner, prompt_ids, max_new_tokens, beam_width, length_penalty,
                        stop, embeddings, embeddings_mask, extra_kv, progress)
  logits_BxV, cache, position_B, extra_B = _prefill(
      llm, runner, prompt_ids, max_new_tokens, num_samples, embeddings, embeddings_mask,
      extra_kv)
  sample = jax.jit(functools.partial(sample_logits, temperature=temperature, top_k=top_k))
  rng = jax.random.key(seed)
  batch = logits_BxV.shape[0]
  tokens_BxT = np.zeros((batch, max_new_tokens), np.int32)
  done_B = np.zeros(batch, bool)
  ones_Bx1 = np.ones((batch, 1), np.int32)
  steps = 0
  for t in range(max_new_tokens):
    next_B = np.asarray(sample(jax.random.fold_in(rng, t), logits_BxV))
    tokens_BxT[:, t] = np.where(done_B, llm.tokenizer.pad_id, next_B)
    done_B |= np.isin(next_B, list(stop))
    steps = t + 1
    if progress is not None:
      progress(t)
    if done_B.all() or t == max_new_tokens - 1:
      break
    logits_BxV, cache = runner(next_B[:, None], ones_Bx1, (position_B + t)[:, None], cache,
                               extra=extra_B)
  rows = []
  for row in tokens_BxT[:, :steps]:
    end = next((i for i, tok in enumerate(row) if tok in stop), len(row))
    rows.append([int(x) for x in row[:end]])
  return [rows[i * num_samples:(i + 1) * num_samples] for i in range(len(prompt_ids))]


def _beam_search(llm, runner, prompt_ids, max_new_tokens, width, length_penalty, stop,
                 embeddings, embeddings_mask, extra_kv, progress):
  """Standard beam search: keep the W best partial sequences of each prompt.

  A finished beam (it emitted a stop token) stays in the beam with its score frozen,
  competing with the unfinished ones; the search ends when every beam of every prompt
  has finished or after max_new_tokens.
  """
  num_prompts = len(prompt_ids)
  logits_BxV, cache, position_B, extra_B = _prefill(
      llm, runner, prompt_ids, max_new_tokens, width, embeddings, embeddings_mask, extra_kv)
  vocab = logits_BxV.shape[-1]
  stop_V = np.zeros(vocab, bool)
  stop_V[[s for s in stop if s < vocab]] = True
  # Only beam 0 is live at the start: the W copies of a prompt would tie otherwise.
  scores_UxW = np.full((num_prompts, width), -np.inf)
  scores_UxW[:, 0] = 0.0
  finished_UxW = np.zeros((num_prompts, width), bool)
  lengths_UxW = np.zeros((num_prompts, width), np.int64)
  sequences_UxWxT = np.zeros((num_prompts, width, 0), np.int32)
  log_softmax = jax.jit(jax.nn.log_softmax)
  reorder = jax.jit(_take_rows)
  ones_Bx1 = np.ones((num_prompts * width, 1), np.int32)
  for t in range(max_new_tokens):
    logp_UxWxV = np.asarray(log_softmax(logits_BxV), np.float64).reshape(num_prompts, width, vocab)
    # A finished beam extends only by a free, invisible pad: its score stays as it is.
    logp_UxWxV = np.where(finished_UxW[..., None], -np.inf, logp_UxWxV)
    logp_UxWxV[..., 0] = np.where(finished_UxW, 0.0, logp_UxWxV[..., 0])
    candidates_UxWV = (scores_UxW[..., None] + logp_UxWxV).reshape(num_prompts, -1)
    best_UxW = np.argsort(-candidates_UxWV, axis=1, kind="stable")[:, :width]
    beam_UxW, token_UxW = best_UxW // vocab, (best_UxW % vocab).astype(np.int32)
    rows_U = np.arange(num_prompts)[:, None]
    was_finished_UxW = finished_UxW[rows_U, beam_UxW]
    scores_UxW = candidates_UxWV[rows_U, best_UxW]
    token_UxW = np.where(was_finished_UxW, llm.tokenizer.pad_id, token_UxW)
    sequences_UxWxT = np.concatenate([sequences_UxWxT[rows_U, beam_UxW], token_UxW[..., None]], 2)
    lengths_UxW = lengths_UxW[rows_U, beam_UxW] + ~was_finished_UxW
    finished_UxW = was_finished_UxW | stop_V[token_UxW]
    if progress is not None:
      progress(t)
    if finished_UxW.all() or t == max_new_tokens - 1:
      break
    source_rows_B = (rows_U * width + beam_UxW).reshape(-1)
    cache = reorder(cache, jnp.asarray(source_rows_B))
    logits_BxV, cache = runner(token_UxW.reshape(-1, 1), ones_Bx1, (position_B + t)[:, None],
                               cache, extra=extra_B)
  normalised_UxW = scores_UxW / np.maximum(lengths_UxW, 1) ** length_penalty
  out = []
  for u in range(num_prompts):
    best = int(np.argmax(normalised_UxW[u]))
    seq = []
    for tok in sequences_UxWxT[u, best]:
      if tok in stop:
        break
      seq.append(int(tok))
    out.append([seq])
  return out


def sequence_log_probs(llm, prompt_ids: Sequence[int], continuations: Sequence[Sequence[int]],
                       params: Any = None) -> np.ndarray:
  """log p(continuation | prompt) of each (equal-length) continuation, in one forward pass."""
  ids_BxL = np.asarray([list(prompt_ids) + list(c) for c in continuations], np.int32)
  out = jax.jit(llm.module.apply, static_argnames="return_logits")(
      {"params": llm.params if params is None else params}, ids_BxL, return_logits=True)
  logp_BxLxV = np.asarray(jax.nn.log_softmax(out.logits), np.float64)
  start = len(prompt_ids)
  targets_BxT = ids_BxL[:, start:]
  steps = np.arange(targets_BxT.shape[1])
  return logp_BxLxV[:, start - 1 + steps][np.arange(len(ids_BxL))[:, None], steps,
                                          targets_BxT].sum(axis=1)
