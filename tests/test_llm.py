"""vlpre.llm: the one decoder's inputs, masks, extra keys/values, cache, decoding and loss.

Small random decoders check each property against a naive reference; the packaged
SmolLM2 checks loading (scanned = unrolled) and generation on real weights.
"""
import dataclasses
import functools
import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlpre import llm as llm_lib
from vlpre import losses
from vlpre.llm import generate as generate_lib
from vlpre.llm import model as model_lib
from vlpre.llm import rope

CONFIG = llm_lib.DecoderConfig(vocab_size=11, hidden_size=32, intermediate_size=48,
                               num_layers=3, num_heads=4, num_kv_heads=2, head_dim=8,
                               rope_theta=1e4, rms_norm_eps=1e-6)


def _random_params(module, length=6, seed=0):
  ids = jnp.zeros((1, length), jnp.int32)
  # jitted: an eager init compiles each of the module's ops on its own (seconds on XLA:CPU)
  init = jax.jit(functools.partial(module.init, return_logits=True))
  params = init(jax.random.key(seed), ids)["params"]
  # RMSNorm scales start at 1: make them matter.
  return jax.tree.map(lambda x: x + 0.1 * jax.random.normal(jax.random.key(seed + 1), x.shape),
                      nn.meta.unbox(params))


def _unstack(params, num_layers):
  """Scanned ({"layers": stacked}) → unrolled ({"layers_i": ...}) parameters."""
  out = {k: v for k, v in params.items() if k != "layers"}
  for i in range(num_layers):
    out[f"layers_{i}"] = jax.tree.map(lambda a, i=i: a[i], params["layers"])
  return out


@pytest.fixture(scope="module")
def tiny():
  module = llm_lib.Decoder(CONFIG)
  return module, _random_params(module)


def _ids(batch, length, seed=0):
  return np.random.default_rng(seed).integers(0, CONFIG.vocab_size, (batch, length)).astype(np.int32)


# ------------------------------------------------------------------------------ inputs


def test_embeddings_in_equals_ids_in(tiny):
  module, params = tiny
  ids_BxL = _ids(2, 7)
  by_ids = module.apply({"params": params}, ids_BxL, return_logits=True)
  table_VxD = params["embed_tokens"]["embedding"]
  by_embeddings = module.apply({"params": params}, embeddings_BxLxD=table_VxD[ids_BxL],
                               return_logits=True)
  np.testing.assert_allclose(by_embeddings.logits, by_ids.logits, rtol=1e-6, atol=1e-6)
  # Interleaved: embeddings at some positions, token ids elsewhere (image tokens in text).
  other_BxLxD = np.random.default_rng(1).normal(size=(2, 7, 32)).astype(np.float32)
  where_BxL = np.zeros((2, 7), bool)
  where_BxL[:, 2:4] = True
  mixed = module.apply({"params": params}, ids_BxL, embeddings_BxLxD=other_BxLxD,
                       embeddings_mask_BxL=where_BxL, return_logits=True)
  manual_BxLxD = np.where(where_BxL[..., None], other_BxLxD, table_VxD[ids_BxL])
  expected = module.apply({"params": params}, embeddings_BxLxD=manual_BxLxD, return_logits=True)
  np.testing.assert_allclose(mixed.logits, expected.logits, rtol=1e-6, atol=1e-6)
  assert not np.allclose(mixed.logits[:, 2:], by_ids.logits[:, 2:])  # the swap mattered.
  np.testing.assert_allclose(mixed.logits[:, :2], by_ids.logits[:, :2], rtol=1e-5, atol=1e-6)


def test_segment_ids_block_attention_across_documents(tiny):
  module, params = tiny
  doc_a, doc_b = _ids(1, 4, seed=1)[0], _ids(1, 5, seed=2)[0]
  packed_1xL = np.concatenate([doc_a, doc_b])[None]
  segments_1xL = np.array([[1] * 4 + [2] * 5])
  positions_1xL = np.array([list(range(4)) + list(range(5))])  # restart per document
  packed = module.apply({"params": params}, packed_1xL, segments_1xL,
                        positions_BxL=positions_1xL, return_logits=True).logits
  alone_a = module.apply({"params": params}, doc_a[None], return_logits=True).logits
  alone_b = module.apply({"params": params}, doc_b[None], return_logits=True).logits
  np.testing.assert_allclose(packed[0, :4], alone_a[0], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(packed[0, 4:], alone_b[0], rtol=1e-5, atol=1e-5)
  # Without segment ids, document b does see document a.
  leaky = module.apply({"params": params}, packed_1xL, positions_BxL=positions_1xL,
                       return_logits=True).logits
  assert not np.allclose(leaky[0, 4:], alone_b[0], atol=1e-3)


def test_padding_is_invisible_and_bidirectional_sees_ahead(tiny):
  module, params = tiny
  ids_1xL = _ids(1, 5, seed=3)
  padded_1xL = np.concatenate([ids_1xL, [[0, 0, 0]]], axis=1)
  mask_1xL = np.array([[1] * 5 + [0] * 3])
  full = module.apply({"params": params}, ids_1xL).hidden
  padded = module.apply({"params": params}, padded_1xL, mask_1xL).hidden
  np.testing.assert_allclose(padded[:, :5], full, rtol=1e-5, atol=1e-5)
  bidirectional = module.clone(causal=False)
  changed_1xL = ids_1xL.copy()
  changed_1xL[0, -1] = (changed_1xL[0, -1] + 1) % CONFIG.vocab_size
  first = lambda m, x: m.apply({"params": params}, x).hidden[0, 0]
  np.testing.assert_allclose(first(module, ids_1xL), first(module, changed_1xL), atol=1e-6)
  assert not np.allclose(first(bidirectional, ids_1xL), first(bidirectional, changed_1xL))


# ------------------------------------------------------------------- extra keys/values


def _naive_attention(x_TxD, p, positions_T, extra_k_SxGxK, extra_v_SxGxK, extra_mask_S, cfg,
                     q_norm_scale_K=None):
  """One causal GQA attention over [own keys; extra keys], written out in numpy.

  With `q_norm_scale_K`, the extra keys are scored by the RMS-normalised (un-rotated)
  queries times that gain (QK-norm of the cross-attention)."""
  x = np.asarray(x_TxD, np.float64)
  q = (x @ p["q_proj"]["kernel"]).reshape(len(x), cfg.num_heads, cfg.head_dim)
  q_extra = None
  if q_norm_scale_K is not None:
    q_extra = q / np.sqrt(np.mean(q**2, -1, keepdims=True) + cfg.rms_norm_eps) * q_norm_scale_K
  k = (x @ p["k_proj"]["kernel"]).reshape(len(x), cfg.num_kv_heads, cfg.head_dim)
  v = (x @ p["v_proj"]["kernel"]).reshape(len(x), cfg.num_kv_heads, cfg.head_dim)
  inv_freq = rope.inverse_frequencies(cfg.head_dim, cfg.rope_theta)

  def rotate(a, pos):  # rotate_half RoPE, one position at a time
    angle = pos * inv_freq
    cos, sin = np.concatenate([np.cos(angle)] * 2), np.concatenate([np.sin(angle)] * 2)
    half = a.shape[-1] // 2
    return a * cos + np.concatenate([-a[..., half:], a[..., :half]], -1) * sin

  q = np.stack([rotate(q[t], positions_T[t]) for t in range(len(x))])
  q_extra = q if q_extra is None else q_extra  # plain extra keys: the layer's rotated queries
  k = np.stack([rotate(k[t], positions_T[t]) for t in range(len(x))])
  keys = np.concatenate([k, extra_k_SxGxK], 0)
  values = np.concatenate([v, extra_v_SxGxK], 0)
  group = cfg.num_heads // cfg.num_kv_heads
  out = np.zeros((len(x), cfg.num_heads, cfg.head_dim))
  for t in range(len(x)):
    visible = [j <= t for j in range(len(x))] + [bool(m) for m in extra_mask_S]
    for n in range(cfg.num_heads):
      scores = np.array([(q[t, n] if j < len(x) else q_extra[t, n]) @ keys[j, n // group] /
                         np.sqrt(cfg.head_dim) for j in range(len(keys))])
      scores = np.where(visible, scores, -np.inf)
      weights = np.exp(scores - scores.max())
      weights /= weights.sum()
      out[t, n] = weights @ values[:, n // group]
  return out.reshape(len(x), -1) @ p["o_proj"]["kernel"]


def test_extra_kv_equals_naive_attention_over_the_concatenation():
  cfg = CONFIG
  attention = model_lib.Attention(cfg)
  rng = np.random.default_rng(4)
  x_1xTxD = rng.normal(size=(1, 5, 32)).astype(np.float32)
  positions_1xT = np.arange(5)[None]
  mask_1x1xTxT = np.tril(np.ones((5, 5), bool))[None, None]
  extra = llm_lib.ExtraKV(k_BxSxGxK=rng.normal(size=(1, 3, 2, 8)).astype(np.float32),
                          v_BxSxGxK=rng.normal(size=(1, 3, 2, 8)).astype(np.float32),
                          mask_BxS=np.array([[True, True, False]]))
  params = nn.meta.unbox(attention.init(jax.random.key(0), x_1xTxD, positions_1xT, mask_1x1xTxT,
                                        extra=extra)["params"])
  out, _ = attention.apply({"params": params}, x_1xTxD, positions_1xT, mask_1x1xTxT, extra=extra)
  expected = _naive_attention(x_1xTxD[0], jax.tree.map(np.asarray, params), np.arange(5),
                              extra.k_BxSxGxK[0], extra.v_BxSxGxK[0], extra.mask_BxS[0], cfg)
  np.testing.assert_allclose(out[0], expected, rtol=1e-4, atol=1e-5)
  # The masked extra slot is ignored: changing it changes nothing.
  poked_v = extra.v_BxSxGxK.copy()
  poked_v[:, 2] = 100.0
  poked = dataclasses.replace(extra, v_BxSxGxK=poked_v)
  np.testing.assert_allclose(
      attention.apply({"params": params}, x_1xTxD, positions_1xT, mask_1x1xTxT, extra=poked)[0],
      out, rtol=1e-6)


def test_extra_kv_with_qk_norm_equals_naive_attention():
  cfg = CONFIG
  attention = model_lib.Attention(cfg)
  rng = np.random.default_rng(7)
  x_1xTxD = rng.normal(size=(1, 5, 32)).astype(np.float32)
  positions_1xT = np.arange(5)[None]
  mask_1x1xTxT = np.tril(np.ones((5, 5), bool))[None, None]
  scale_K = rng.uniform(0.5, 2.0, size=8).astype(np.float32)
  extra = llm_lib.ExtraKV(k_BxSxGxK=rng.normal(size=(1, 4, 2, 8)).astype(np.float32),
                          v_BxSxGxK=rng.normal(size=(1, 4, 2, 8)).astype(np.float32),
                          mask_BxS=np.array([[True, False, True, True]]),
                          q_norm_scale_BxK=scale_K[None])
  params = nn.meta.unbox(attention.init(jax.random.key(0), x_1xTxD, positions_1xT, mask_1x1xTxT,
                                        extra=extra)["params"])
  out, _ = attention.apply({"params": params}, x_1xTxD, positions_1xT, mask_1x1xTxT, extra=extra)
  expected = _naive_attention(x_1xTxD[0], jax.tree.map(np.asarray, params), np.arange(5),
                              extra.k_BxSxGxK[0], extra.v_BxSxGxK[0], extra.mask_BxS[0], cfg,
                              q_norm_scale_K=scale_K)
  np.testing.assert_allclose(out[0], expected, rtol=1e-4, atol=1e-5)
  plain = attention.apply({"params": params}, x_1xTxD, positions_1xT, mask_1x1xTxT,
                          extra=dataclasses.replace(extra, q_norm_scale_BxK=None))[0]
  assert not np.allclose(plain, out, atol=1e-3)  # the normalised queries do change the output


def test_rope_2d_depends_on_row_and_column_offsets_only():
  rng = np.random.default_rng(8)
  q_1x1x1xK, k_1x1x1xK = rng.normal(size=(2, 1, 1, 1, 16)).astype(np.float32)

  def score(qr, qc, kr, kc):
    def rot(x, r, c):
      return rope.apply_rope_2d(x, np.array([[r]]), np.array([[c]]))
    return float(jnp.sum(rot(q_1x1x1xK, qr, qc) * rot(k_1x1x1xK, kr, kc)))

  base = score(3, 1, 1, 4)
  np.testing.assert_allclose(score(3 + 5, 1 + 2, 1 + 5, 4 + 2), base, rtol=1e-4)  # shift both
  assert abs(score(3 + 1, 1, 1, 4) - base) > 1e-3   # a row offset matters
  assert abs(score(3, 1 + 1, 1, 4) - base) > 1e-3   # a column offset matters
  np.testing.assert_allclose(score(0, 0, 0, 0), float(np.sum(q_1x1x1xK * k_1x1x1xK)), rtol=1e-5)
  rows, cols = rope.grid_positions(2, 3)
  assert rows.tolist() == [0, 0, 0, 1, 1, 1] and cols.tolist() == [0, 1, 2, 0, 1, 2]
  # Rows and columns rotate separate halves: swapping them is a different rotation.
  assert abs(score(2, 0, 0, 0) - score(0, 2, 0, 0)) > 1e-3


@pytest.mark.slow
def test_extra_kv_reaches_only_its_layer_scanned_or_not(tiny):
  module, params = tiny
  ids_BxL = _ids(2, 4, seed=5)
  rng = np.random.default_rng(6)
  extra = llm_lib.ExtraKV(k_BxSxGxK=rng.normal(size=(2, 3, 2, 8)).astype(np.float32),
                          v_BxSxGxK=rng.normal(size=(2, 3, 2, 8)).astype(np.float32),
                          mask_BxS=np.ones((2, 3), bool),
                          positions_BxS=np.zeros((2, 3), np.int32))
  plain = module.apply({"params": params}, ids_BxL, return_all_hidden=True)
  scanned = module.apply({"params": params}, ids_BxL, extra_kv={1: extra}, return_all_hidden=True)
  unrolled = module.clone(scan=False).apply({"params": _unstack(params, 3)}, ids_BxL,
                                            extra_kv={1: extra}, return_all_hidden=True)
  np.testing.assert_allclose(scanned.all_hidden, unrolled.all_hidden, rtol=1e-5, atol=1e-5)
  # Layer 0's output (all_hidden[1]) is untouched; layer 1's onwards change.
  np.testing.assert_allclose(scanned.all_hidden[:2], plain.all_hidden[:2], rtol=1e-5, atol=1e-6)
  assert not np.allclose(scanned.all_hidden[2], plain.all_hidden[2], atol=1e-3)


# --------------------------------------------------------------------- layer layouts


@pytest.mark.slow
def test_scanned_unrolled_and_grouped_layers_agree(tiny):
  module, params = tiny
  ids_BxL = _ids(2, 6, seed=7)
  expected = module.apply({"params": params}, ids_BxL, return_logits=True).logits
  unrolled = module.clone(scan=False).apply({"params": _unstack(params, 3)}, ids_BxL,
                                            return_logits=True).logits
  grouped_params = {k: v for k, v in params.items() if k != "layers"}
  grouped_params["layers_0to0"] = jax.tree.map(lambda a: a[:1], params["layers"])
  grouped_params["layers_1to2"] = jax.tree.map(lambda a: a[1:], params["layers"])
  grouped = module.clone(layer_groups=(1, 2))
  assert set(nn.meta.unbox(grouped.init(jax.random.key(0), ids_BxL)["params"])) == {
      "embed_tokens", "layers_0to0", "layers_1to2", "norm"}
  np.testing.assert_allclose(unrolled, expected, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(grouped.apply({"params": grouped_params}, ids_BxL,
                                           return_logits=True).logits, expected, rtol=1e-5,
                             atol=1e-5)
  with pytest.raises(ValueError, match="sum to the 3 layers"):
    module.clone(layer_groups=(1, 1)).init(jax.random.key(0), ids_BxL)


@pytest.mark.parametrize("remat", ["full", "dots", "dots_no_batch"])
def test_remat_policies_keep_gradients(tiny, remat):
  module, params = tiny
  ids_BxL = _ids(2, 6, seed=8)

  def loss(m, p):
    return jnp.sum(m.apply({"params": p}, ids_BxL, return_logits=True).logits ** 2)

  expected = jax.grad(functools.partial(loss, module))(params)
  actual = jax.grad(functools.partial(loss, module.clone(remat=remat)))(params)
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=2e-5),
               actual, expected)


# ------------------------------------------------------------------------- KV cache


@pytest.mark.parametrize("scan", [True, False])
def test_cached_decoding_equals_the_uncached_forward(tiny, scan):
  module, params = tiny
  if not scan:
    module, params = module.clone(scan=False), _unstack(params, 3)
  ids_BxL = _ids(2, 7, seed=9)
  expected = module.apply({"params": params}, ids_BxL, return_logits=True).logits
  cache = model_lib.init_cache(CONFIG, 2, 9, scan=scan)
  out = module.apply({"params": params}, ids_BxL[:, :4], cache=cache, return_logits=True)
  logits = [out.logits]
  for t in range(4, 7):  # then one token at a time
    out = module.apply({"params": params}, ids_BxL[:, t:t + 1], cache=out.cache,
                       return_logits=True)
    logits.append(out.logits)
  np.testing.assert_allclose(np.concatenate(logits, 1), expected, rtol=1e-5, atol=1e-5)
  assert int(out.cache["index"]) == 7


@pytest.mark.slow
def test_sliding_window_in_cache_and_forward_agree():
  cfg = dataclasses.replace(CONFIG, sliding_window=3)
  module = llm_lib.Decoder(cfg)
  params = _random_params(module)
  ids_BxL = _ids(1, 6, seed=10)
  expected = module.apply({"params": params}, ids_BxL, return_logits=True).logits
  out = module.apply({"params": params}, ids_BxL[:, :2], cache=model_lib.init_cache(cfg, 1, 6),
                     return_logits=True)
  logits = [out.logits]
  for t in range(2, 6):
    out = module.apply({"params": params}, ids_BxL[:, t:t + 1], cache=out.cache,
                       return_logits=True)
    logits.append(out.logits)
  np.testing.assert_allclose(np.concatenate(logits, 1), expected, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------- generation


class _TinyLLM(llm_lib.LLM):
  def stop_ids(self):
    return set()


class _Tokenizer:
  pad_id = 0


def _tiny_llm(tiny):
  module, params = tiny
  return _TinyLLM(name="tiny", module=module, params=params, tokenizer=_Tokenizer(),
                  config=CONFIG, hf_config=None)


@pytest.mark.slow
def test_greedy_generation_follows_the_argmax_of_the_full_forward(tiny):
  llm = _tiny_llm(tiny)
  prompts = [[3, 4, 5], [7]]  # different lengths: left padding must not matter
  out = generate_lib.generate(llm, prompts, max_new_tokens=4)
  for prompt, (completion,) in zip(prompts, out):
    sequence = list(prompt)
    for _ in range(4):  # naive: rerun the whole sequence for every token
      logits = llm.module.apply({"params": llm.params}, np.array([sequence]),
                                return_logits=True).logits
      sequence.append(int(np.argmax(logits[0, -1])))
    assert completion == sequence[len(prompt):]


@pytest.mark.slow
def test_beam_search_finds_the_most_likely_continuation(tiny):
  llm = _tiny_llm(tiny)
  prompt, steps = [2, 9, 4], 3
  every = list(itertools.product(range(CONFIG.vocab_size), repeat=steps))
  scores = dict(zip(every, generate_lib.sequence_log_probs(llm, prompt, every)))
  best = max(scores, key=scores.get)
  # A beam as wide as V^(steps-1) cannot lose the optimum; length_penalty 0 = raw log-prob.
  (beam,), = generate_lib.generate(llm, [prompt], max_new_tokens=steps,
                                   beam_width=CONFIG.vocab_size ** (steps - 1),
                                   length_penalty=0.0)
  assert tuple(beam) == best
  (narrow,), = generate_lib.generate(llm, [prompt], max_new_tokens=steps, beam_width=2,
                                     length_penalty=0.0)
  (greedy,), = generate_lib.generate(llm, [prompt], max_new_tokens=steps)
  (width1,), = generate_lib.generate(llm, [prompt], max_new_tokens=steps, beam_width=1)
  assert width1 == greedy
  assert scores[tuple(narrow)] >= scores[tuple(greedy)] - 1e-9


@pytest.mark.slow
def test_beam_search_stops_at_a_stop_token(tiny):
  llm = _tiny_llm(tiny)
  (greedy,), = generate_lib.generate(llm, [[1, 2]], max_new_tokens=5)
  stop = greedy[1]
  (beam,), = generate_lib.generate(llm, [[1, 2]], max_new_tokens=5, beam_width=3,
                                   stop_ids=[stop])
  assert stop not in beam
  steps = []
  (ended,), = generate_lib.generate(llm, [[1, 2]], max_new_tokens=5, beam_width=3,
                                    stop_ids=range(CONFIG.vocab_size), progress=steps.append)
  assert ended == [] and steps == [0]  # every beam finished at once: no second step.


@pytest.mark.slow
def test_sampling_is_seeded_and_top_k_restricted(tiny):
  llm = _tiny_llm(tiny)
  run = functools.partial(generate_lib.generate, llm, [[1, 2, 3]], max_new_tokens=6,
                          temperature=1.0, num_samples=8)
  assert run(seed=3) == run(seed=3)
  assert run(seed=3) != run(seed=4)
  logits = np.array([[0.0, 5.0, 4.0, -1.0]])
  for seed in range(20):
    token = int(generate_lib.sample_logits(jax.random.key(seed), logits, 1.0, 2)[0])
    assert token in (1, 2)


# --------------------------------------------------------------------------- LM loss


def test_next_token_loss_matches_naive_reference():
  rng = np.random.default_rng(11)
  logits_BxLxV = rng.normal(size=(3, 5, 7)).astype(np.float32)
  targets_BxL = rng.integers(0, 7, size=(3, 5))
  weights_BxL = (rng.random((3, 5)) > 0.3).astype(np.float32)
  loss, metrics = losses.lm_loss({"lm_logits": logits_BxLxV, "lm_targets": targets_BxL,
                                  "lm_weights": weights_BxL}, {})
  nll, correct, count = 0.0, 0.0, 0.0
  for b, t in itertools.product(range(3), range(5)):
    if weights_BxL[b, t]:
      z = logits_BxLxV[b, t].astype(np.float64)
      nll += np.log(np.exp(z).sum()) - z[targets_BxL[b, t]]
      correct += float(np.argmax(z) == targets_BxL[b, t])
      count += 1
  np.testing.assert_allclose(loss, nll / count, rtol=1e-5)
  np.testing.assert_allclose(metrics["accuracy"], correct / count, rtol=1e-6)
  assert metrics["num_tokens"] == count
  zero, _ = losses.lm_loss({"lm_logits": logits_BxLxV, "lm_targets": targets_BxL,
                            "lm_weights": np.zeros_like(weights_BxL)}, {})
  assert float(zero) == 0.0  # nothing to predict: no NaN.


@pytest.mark.slow
@pytest.mark.parametrize("scan", [True, False])
def test_drop_path_drops_whole_branches_per_sample_only_in_training(tiny, scan):
  module, params = tiny
  if not scan:
    params = _unstack(params, 3)
  module = module.clone(drop_path=0.6, scan=scan)
  ids_BxL = np.tile(_ids(1, 5, seed=12), (64, 1))  # 64 copies of one sequence
  plain = module.clone(drop_path=0.0).apply({"params": params}, ids_BxL).hidden
  np.testing.assert_allclose(module.apply({"params": params}, ids_BxL).hidden, plain, rtol=1e-6)
  train = module.apply({"params": params}, ids_BxL, deterministic=False,
                       rngs={"dropout": jax.random.key(0)}).hidden
  # Layer 0 has rate 0; the rows differ by which later branches were dropped.
  distinct = {tuple(np.round(np.asarray(row[-1]), 4)) for row in train}
  assert len(distinct) > 1 and not np.allclose(train, plain)
  again = module.apply({"params": params}, ids_BxL, deterministic=False,
                       rngs={"dropout": jax.random.key(0)}).hidden
  np.testing.assert_array_equal(again, train)  # seeded


# ------------------------------------------------------------------ abstract weights


def _shapes_only_folder(tmp_path):
  """A Mistral-architecture folder (2 layers, width 64) of config.json and SmolLM2's
  tokenizer, without weights: what bench/shapes_only_llm.py writes for Mistral-7B."""
  from bench import shapes_only_llm  # pylint: disable=g-import-not-at-top
  fields = dict(shapes_only_llm.PRESETS["mistral-7b"], hidden_size=64, intermediate_size=128,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16)
  return shapes_only_llm.write(str(tmp_path / "shapes-only"), fields)


def test_abstract_weights_need_only_the_config_and_tokenizer(tmp_path):
  """Inside `abstract_weights()` a folder without weights builds the decoder and the pooled
  text encoder with ShapeDtypeStruct parameters of the module's own shapes; outside, the
  same folder is refused for its missing weights, and nothing abstract is cached."""
  from vlpre import text_encoders  # pylint: disable=g-import-not-at-top
  folder = _shapes_only_folder(tmp_path)
  with llm_lib.abstract_weights():
    assert llm_lib.weights_abstract()
    decoder = llm_lib.load(folder, lm_head=False)
    encoder = text_encoders.load_text_encoder(folder, max_len=16)
  assert not llm_lib.weights_abstract()
  expected = llm_lib.param_shapes(decoder.module)
  assert jax.tree.structure(decoder.params) == jax.tree.structure(expected)
  for leaf, want in zip(jax.tree.leaves(decoder.params), jax.tree.leaves(expected)):
    assert isinstance(leaf, jax.ShapeDtypeStruct) and leaf.shape == want.shape
  assert decoder.config.vocab_size == 32_000 and decoder.config.num_layers == 2
  assert encoder.dim == 64
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(encoder.params))
  ids_BxL, mask_BxL = encoder.tokenizer.encode_batch(["a dog runs"], 16)
  assert ids_BxL.shape == (1, 16) and 0 < mask_BxL.sum() < 16
  with pytest.raises(FileNotFoundError, match="no model.safetensors"):
    llm_lib.load(folder, lm_head=False)
