"""The one transformer core (vlpre.nn): parameter paths, outputs and the attention op.

The golden parameter paths and shapes, and tests/testdata/core_reference.npz, were written
by the code before the towers and the decoder moved onto vlpre.nn (tests/core_cases.py
`__main__`): checkpoints written then must restore, and the same parameters must give the
same outputs.
"""
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import core_cases
from vlpre import sharding
from vlpre import train
from vlpre.nn import attention as attention_lib
from vlpre.nn import layers
from vlpre.nn import platform
from vlpre.nn import stack as stack_lib

# Every parameter path and shape, per layout (scan / one subtree per block / layer groups).
GOLDEN_PARAMS = {'llm_groups': {'embed_tokens/embedding': (11, 32),
                'layers_0to0/input_layernorm/scale': (1, 32),
                'layers_0to0/mlp/down_proj/kernel': (1, 48, 32),
                'layers_0to0/mlp/gate_proj/kernel': (1, 32, 48),
                'layers_0to0/mlp/up_proj/kernel': (1, 32, 48),
                'layers_0to0/post_attention_layernorm/scale': (1, 32),
                'layers_0to0/self_attn/k_proj/kernel': (1, 32, 16),
                'layers_0to0/self_attn/o_proj/kernel': (1, 32, 32),
                'layers_0to0/self_attn/q_proj/kernel': (1, 32, 32),
                'layers_0to0/self_attn/v_proj/kernel': (1, 32, 16),
                'layers_1to2/input_layernorm/scale': (2, 32),
                'layers_1to2/mlp/down_proj/kernel': (2, 48, 32),
                'layers_1to2/mlp/gate_proj/kernel': (2, 32, 48),
                'layers_1to2/mlp/up_proj/kernel': (2, 32, 48),
                'layers_1to2/post_attention_layernorm/scale': (2, 32),
                'layers_1to2/self_attn/k_proj/kernel': (2, 32, 16),
                'layers_1to2/self_attn/o_proj/kernel': (2, 32, 32),
                'layers_1to2/self_attn/q_proj/kernel': (2, 32, 32),
                'layers_1to2/self_attn/v_proj/kernel': (2, 32, 16),
                'norm/scale': (32,)},
 'llm_noscan': {'embed_tokens/embedding': (11, 32),
                'layers_0/input_layernorm/scale': (32,),
                'layers_0/mlp/down_proj/kernel': (48, 32),
                'layers_0/mlp/gate_proj/kernel': (32, 48),
                'layers_0/mlp/up_proj/kernel': (32, 48),
                'layers_0/post_attention_layernorm/scale': (32,),
                'layers_0/self_attn/k_proj/kernel': (32, 16),
                'layers_0/self_attn/o_proj/kernel': (32, 32),
                'layers_0/self_attn/q_proj/kernel': (32, 32),
                'layers_0/self_attn/v_proj/kernel': (32, 16),
                'layers_1/input_layernorm/scale': (32,),
                'layers_1/mlp/down_proj/kernel': (48, 32),
                'layers_1/mlp/gate_proj/kernel': (32, 48),
                'layers_1/mlp/up_proj/kernel': (32, 48),
                'layers_1/post_attention_layernorm/scale': (32,),
                'layers_1/self_attn/k_proj/kernel': (32, 16),
                'layers_1/self_attn/o_proj/kernel': (32, 32),
                'layers_1/self_attn/q_proj/kernel': (32, 32),
                'layers_1/self_attn/v_proj/kernel': (32, 16),
                'layers_2/input_layernorm/scale': (32,),
                'layers_2/mlp/down_proj/kernel': (48, 32),
                'layers_2/mlp/gate_proj/kernel': (32, 48),
                'layers_2/mlp/up_proj/kernel': (32, 48),
                'layers_2/post_attention_layernorm/scale': (32,),
                'layers_2/self_attn/k_proj/kernel': (32, 16),
                'layers_2/self_attn/o_proj/kernel': (32, 32),
                'layers_2/self_attn/q_proj/kernel': (32, 32),
                'layers_2/self_attn/v_proj/kernel': (32, 16),
                'norm/scale': (32,)},
 'llm_qknorm_window': {'embed_tokens/embedding': (11, 32),
                       'layers/input_layernorm/scale': (3, 32),
                       'layers/mlp/down_proj/kernel': (3, 48, 32),
                       'layers/mlp/gate_proj/kernel': (3, 32, 48),
                       'layers/mlp/up_proj/kernel': (3, 32, 48),
                       'layers/post_attention_layernorm/scale': (3, 32),
                       'layers/self_attn/k_norm/scale': (3, 8),
                       'layers/self_attn/k_proj/kernel': (3, 32, 16),
                       'layers/self_attn/o_proj/kernel': (3, 32, 32),
                       'layers/self_attn/q_norm/scale': (3, 8),
                       'layers/self_attn/q_proj/kernel': (3, 32, 32),
                       'layers/self_attn/v_proj/kernel': (3, 32, 16),
                       'norm/scale': (32,)},
 'llm_scan': {'embed_tokens/embedding': (11, 32),
              'layers/input_layernorm/scale': (3, 32),
              'layers/mlp/down_proj/kernel': (3, 48, 32),
              'layers/mlp/gate_proj/kernel': (3, 32, 48),
              'layers/mlp/up_proj/kernel': (3, 32, 48),
              'layers/post_attention_layernorm/scale': (3, 32),
              'layers/self_attn/k_proj/kernel': (3, 32, 16),
              'layers/self_attn/o_proj/kernel': (3, 32, 32),
              'layers/self_attn/q_proj/kernel': (3, 32, 32),
              'layers/self_attn/v_proj/kernel': (3, 32, 16),
              'norm/scale': (32,)},
 'text_scan0': {'encoder/block_0/attn/key/bias': (2, 8),
                'encoder/block_0/attn/key/kernel': (16, 2, 8),
                'encoder/block_0/attn/out/bias': (16,),
                'encoder/block_0/attn/out/kernel': (2, 8, 16),
                'encoder/block_0/attn/query/bias': (2, 8),
                'encoder/block_0/attn/query/kernel': (16, 2, 8),
                'encoder/block_0/attn/value/bias': (2, 8),
                'encoder/block_0/attn/value/kernel': (16, 2, 8),
                'encoder/block_0/ln_attn/bias': (16,),
                'encoder/block_0/ln_attn/scale': (16,),
                'encoder/block_0/ln_mlp/bias': (16,),
                'encoder/block_0/ln_mlp/scale': (16,),
                'encoder/block_0/mlp/Dense_0/bias': (32,),
                'encoder/block_0/mlp/Dense_0/kernel': (16, 32),
                'encoder/block_0/mlp/Dense_1/bias': (16,),
                'encoder/block_0/mlp/Dense_1/kernel': (32, 16),
                'encoder/block_1/attn/key/bias': (2, 8),
                'encoder/block_1/attn/key/kernel': (16, 2, 8),
                'encoder/block_1/attn/out/bias': (16,),
                'encoder/block_1/attn/out/kernel': (2, 8, 16),
                'encoder/block_1/attn/query/bias': (2, 8),
                'encoder/block_1/attn/query/kernel': (16, 2, 8),
                'encoder/block_1/attn/value/bias': (2, 8),
                'encoder/block_1/attn/value/kernel': (16, 2, 8),
                'encoder/block_1/ln_attn/bias': (16,),
                'encoder/block_1/ln_attn/scale': (16,),
                'encoder/block_1/ln_mlp/bias': (16,),
                'encoder/block_1/ln_mlp/scale': (16,),
                'encoder/block_1/mlp/Dense_0/bias': (32,),
                'encoder/block_1/mlp/Dense_0/kernel': (16, 32),
                'encoder/block_1/mlp/Dense_1/bias': (16,),
                'encoder/block_1/mlp/Dense_1/kernel': (32, 16),
                'encoder/ln_final/bias': (16,),
                'encoder/ln_final/scale': (16,),
                'pos_embedding': (1, 8, 16),
                'token_embed/embedding': (50, 16)},
 'text_scan1': {'encoder/blocks/attn/key/bias': (2, 2, 8),
                'encoder/blocks/attn/key/kernel': (2, 16, 2, 8),
                'encoder/blocks/attn/out/bias': (2, 16),
                'encoder/blocks/attn/out/kernel': (2, 2, 8, 16),
                'encoder/blocks/attn/query/bias': (2, 2, 8),
                'encoder/blocks/attn/query/kernel': (2, 16, 2, 8),
                'encoder/blocks/attn/value/bias': (2, 2, 8),
                'encoder/blocks/attn/value/kernel': (2, 16, 2, 8),
                'encoder/blocks/ln_attn/bias': (2, 16),
                'encoder/blocks/ln_attn/scale': (2, 16),
                'encoder/blocks/ln_mlp/bias': (2, 16),
                'encoder/blocks/ln_mlp/scale': (2, 16),
                'encoder/blocks/mlp/Dense_0/bias': (2, 32),
                'encoder/blocks/mlp/Dense_0/kernel': (2, 16, 32),
                'encoder/blocks/mlp/Dense_1/bias': (2, 16),
                'encoder/blocks/mlp/Dense_1/kernel': (2, 32, 16),
                'encoder/ln_final/bias': (16,),
                'encoder/ln_final/scale': (16,),
                'pos_embedding': (1, 8, 16),
                'token_embed/embedding': (50, 16)},
 'vit_scan0': {'encoder/block_0/attn/key/bias': (2, 8),
               'encoder/block_0/attn/key/kernel': (16, 2, 8),
               'encoder/block_0/attn/out/bias': (16,),
               'encoder/block_0/attn/out/kernel': (2, 8, 16),
               'encoder/block_0/attn/query/bias': (2, 8),
               'encoder/block_0/attn/query/kernel': (16, 2, 8),
               'encoder/block_0/attn/value/bias': (2, 8),
               'encoder/block_0/attn/value/kernel': (16, 2, 8),
               'encoder/block_0/ln_attn/bias': (16,),
               'encoder/block_0/ln_attn/scale': (16,),
               'encoder/block_0/ln_mlp/bias': (16,),
               'encoder/block_0/ln_mlp/scale': (16,),
               'encoder/block_0/mlp/Dense_0/bias': (32,),
               'encoder/block_0/mlp/Dense_0/kernel': (16, 32),
               'encoder/block_0/mlp/Dense_1/bias': (16,),
               'encoder/block_0/mlp/Dense_1/kernel': (32, 16),
               'encoder/block_1/attn/key/bias': (2, 8),
               'encoder/block_1/attn/key/kernel': (16, 2, 8),
               'encoder/block_1/attn/out/bias': (16,),
               'encoder/block_1/attn/out/kernel': (2, 8, 16),
               'encoder/block_1/attn/query/bias': (2, 8),
               'encoder/block_1/attn/query/kernel': (16, 2, 8),
               'encoder/block_1/attn/value/bias': (2, 8),
               'encoder/block_1/attn/value/kernel': (16, 2, 8),
               'encoder/block_1/ln_attn/bias': (16,),
               'encoder/block_1/ln_attn/scale': (16,),
               'encoder/block_1/ln_mlp/bias': (16,),
               'encoder/block_1/ln_mlp/scale': (16,),
               'encoder/block_1/mlp/Dense_0/bias': (32,),
               'encoder/block_1/mlp/Dense_0/kernel': (16, 32),
               'encoder/block_1/mlp/Dense_1/bias': (16,),
               'encoder/block_1/mlp/Dense_1/kernel': (32, 16),
               'encoder/ln_final/bias': (16,),
               'encoder/ln_final/scale': (16,),
               'map_head/key/bias': (2, 8),
               'map_head/key/kernel': (16, 2, 8),
               'map_head/ln/bias': (16,),
               'map_head/ln/scale': (16,),
               'map_head/mlp/Dense_0/bias': (32,),
               'map_head/mlp/Dense_0/kernel': (16, 32),
               'map_head/mlp/Dense_1/bias': (16,),
               'map_head/mlp/Dense_1/kernel': (32, 16),
               'map_head/out/bias': (16,),
               'map_head/out/kernel': (2, 8, 16),
               'map_head/probe': (1, 1, 16),
               'map_head/query/bias': (2, 8),
               'map_head/query/kernel': (16, 2, 8),
               'map_head/value/bias': (2, 8),
               'map_head/value/kernel': (16, 2, 8),
               'patch_embed/bias': (16,),
               'patch_embed/kernel': (4, 4, 3, 16),
               'pos_embedding': (1, 4, 16)},
 'vit_scan1': {'encoder/blocks/attn/key/bias': (2, 2, 8),
               'encoder/blocks/attn/key/kernel': (2, 16, 2, 8),
               'encoder/blocks/attn/out/bias': (2, 16),
               'encoder/blocks/attn/out/kernel': (2, 2, 8, 16),
               'encoder/blocks/attn/query/bias': (2, 2, 8),
               'encoder/blocks/attn/query/kernel': (2, 16, 2, 8),
               'encoder/blocks/attn/value/bias': (2, 2, 8),
               'encoder/blocks/attn/value/kernel': (2, 16, 2, 8),
               'encoder/blocks/ln_attn/bias': (2, 16),
               'encoder/blocks/ln_attn/scale': (2, 16),
               'encoder/blocks/ln_mlp/bias': (2, 16),
               'encoder/blocks/ln_mlp/scale': (2, 16),
               'encoder/blocks/mlp/Dense_0/bias': (2, 32),
               'encoder/blocks/mlp/Dense_0/kernel': (2, 16, 32),
               'encoder/blocks/mlp/Dense_1/bias': (2, 16),
               'encoder/blocks/mlp/Dense_1/kernel': (2, 32, 16),
               'encoder/ln_final/bias': (16,),
               'encoder/ln_final/scale': (16,),
               'map_head/key/bias': (2, 8),
               'map_head/key/kernel': (16, 2, 8),
               'map_head/ln/bias': (16,),
               'map_head/ln/scale': (16,),
               'map_head/mlp/Dense_0/bias': (32,),
               'map_head/mlp/Dense_0/kernel': (16, 32),
               'map_head/mlp/Dense_1/bias': (16,),
               'map_head/mlp/Dense_1/kernel': (32, 16),
               'map_head/out/bias': (16,),
               'map_head/out/kernel': (2, 8, 16),
               'map_head/probe': (1, 1, 16),
               'map_head/query/bias': (2, 8),
               'map_head/query/kernel': (16, 2, 8),
               'map_head/value/bias': (2, 8),
               'map_head/value/kernel': (16, 2, 8),
               'patch_embed/bias': (16,),
               'patch_embed/kernel': (4, 4, 3, 16),
               'pos_embedding': (1, 4, 16)}}


def _golden_key(case):
  tower, layout = case.split("_")[:2]
  if tower in ("vit", "text"):
    return f"{tower}_{layout}"
  return "llm_scan" if case == "llm_bidir" else case


_CASES_RUN = []


@pytest.fixture
def _release_compiled_programs():
  """The core cases' compiled programs, kept until the file ends, peaked at ~2.4 GB, which
  beside the LLM file on the other worker put the fast tier over 4 GB. Released after every
  sixth case: after each one, the pieces the cases share are compiled again (+40 s)."""
  yield
  _CASES_RUN.append(None)
  if len(_CASES_RUN) % 6 == 0:
    train.release_host_memory()


@pytest.fixture(scope="module")
def reference():
  return np.load(pathlib.Path(__file__).parent / "testdata" / "core_reference.npz")


@pytest.mark.usefixtures("_release_compiled_programs")
@pytest.mark.parametrize("case", sorted(core_cases.cases()))
def test_parameter_paths_and_outputs_are_unchanged(case, reference):
  shapes, outputs = core_cases.run(case)
  assert shapes == GOLDEN_PARAMS[_golden_key(case)]
  expected = {k.split("/", 1)[1]: reference[k] for k in reference.files
              if k.split("/", 1)[0] == case}
  assert set(outputs) == set(expected)
  for name, value in outputs.items():
    np.testing.assert_allclose(value, expected[name], rtol=1e-6, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("case", ["vit_scan1_einsum", "text_scan0_causal1_einsum", "llm_groups"])
def test_each_logical_axis_name_has_one_meaning(case):
  """heads = H and kv = K on their own axes; heads_fused = H·K and kv_heads_fused = G·K
  fused; every name has a sharding rule."""
  module, init, _ = core_cases.cases()[case]
  abstract = jax.eval_shape(lambda: init(module))["params"]
  names = jax.tree.leaves(nn.get_partition_spec(abstract),
                          is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  shapes = jax.tree.leaves(jax.tree.map(lambda x: x.shape, nn.meta.unbox(abstract)),
                           is_leaf=lambda x: isinstance(x, tuple))
  if case.startswith("llm"):
    cfg = module.config
    sizes = {"heads_fused": cfg.num_heads * cfg.head_dim,
             "kv_heads_fused": cfg.num_kv_heads * cfg.head_dim}
  else:
    sizes = {"heads": module.num_heads, "kv": module.width // module.num_heads}
  rule_names = {name for name, _ in sharding.DEFAULT_RULES}
  seen = set()
  for spec, shape in zip(names, shapes):
    for name, size in zip(spec, shape):
      assert name is None or name in rule_names, name
      if name in sizes:
        assert size == sizes[name], (name, spec, shape)
      seen.add(name)
  others = {"heads", "kv", "heads_fused", "kv_heads_fused"} - set(sizes)
  assert set(sizes) <= seen and not others & seen


# ------------------------------------------------------------------------ the attention op

CPU_IMPLEMENTATIONS = ("einsum", "dot_product_attention")


def _naive_attention(q, k, v, mask_BxHxTxS, extra_q=None, own_slots=None):
  """float64 softmax(q kᵀ / √K) v per batch row and query head h (key head h // (H/G));
  keys from `own_slots` on are scored by `extra_q` when given; masked keys excluded."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  batch, steps, heads, dim = q.shape
  per_group = heads // k.shape[2]
  out = np.zeros((batch, steps, heads, v.shape[-1]))
  for b in range(batch):
    for h in range(heads):
      keys = k[b, :, h // per_group]
      logits = q[b, :, h] @ keys.T / np.sqrt(dim)
      if extra_q is not None:
        logits[:, own_slots:] = (np.asarray(extra_q[b, :, h], np.float64) @
                                 keys[own_slots:].T / np.sqrt(dim))
      logits = np.where(mask_BxHxTxS[b, h], logits, -np.inf)
      p = np.exp(logits - logits.max(-1, keepdims=True))
      out[b, :, h] = (p / p.sum(-1, keepdims=True)) @ v[b, :, h // per_group]
  return out


def _attention_case(kind, causal):
  """(attention kwargs, naive kwargs) for B=2, T=6 queries (S=7 own keys when "longer")."""
  rng = np.random.default_rng(0)
  batch, steps, heads, groups, dim = 2, 6, 4, (2 if kind != "plain" else 4), 8
  slots = 7 if kind == "longer" else steps
  q = rng.normal(size=(batch, steps, heads, dim)).astype(np.float32)
  k, v = (rng.normal(size=(batch, slots, groups, dim)).astype(np.float32) for _ in range(2))
  kwargs, mask, full_BxHxTxS = {}, None, np.ones((batch, heads, steps, slots), bool)
  if kind == "padding":
    keep_BxS = np.ones((batch, slots), bool)
    keep_BxS[0, 4:] = False
    mask = attention_lib.padding_mask(jnp.asarray(keep_BxS))
    full_BxHxTxS &= keep_BxS[:, None, None, :]
  if kind == "segments":
    segments_BxT = np.array([[1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 1, 1]], np.int32)
    slots_T = np.arange(steps)
    mask = attention_lib.segment_mask(
        jnp.asarray(segments_BxT), jnp.asarray(slots_T), jnp.asarray(segments_BxT * 0 + slots_T),
        jnp.asarray(segments_BxT), jnp.asarray(slots_T), jnp.asarray(segments_BxT * 0 + slots_T),
        causal=False, window=None)
    full_BxHxTxS &= (segments_BxT[:, :, None] == segments_BxT[:, None, :])[:, None]
  if causal:
    full_BxHxTxS &= np.tril(np.ones((steps, slots), bool), k=slots - steps)
  naive = dict(q=q, k=k, v=v, mask_BxHxTxS=full_BxHxTxS)
  if kind.startswith("extra"):
    extras = 5
    extra_k, extra_v = (rng.normal(size=(batch, extras, groups, dim)).astype(np.float32)
                        for _ in range(2))
    extra_mask_BxE = np.ones((batch, extras), bool)
    extra_mask_BxE[1, 3:] = False
    kwargs.update(extra_k_BxExGxK=jnp.asarray(extra_k), extra_v_BxExGxK=jnp.asarray(extra_v),
                  extra_mask_BxE=jnp.asarray(extra_mask_BxE))
    extra_BxHxTxE = np.broadcast_to(extra_mask_BxE[:, None, None, :], (batch, heads, steps, extras))
    naive.update(k=np.concatenate([k, extra_k], 1), v=np.concatenate([v, extra_v], 1),
                 mask_BxHxTxS=np.concatenate([full_BxHxTxS, extra_BxHxTxE], -1))
    if kind == "extra_two_queries":
      extra_q = rng.normal(size=q.shape).astype(np.float32)
      kwargs["extra_q_BxTxHxK"] = jnp.asarray(extra_q)
      naive.update(extra_q=extra_q, own_slots=slots)
  args = (jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), mask)
  return args, dict(causal=causal, **kwargs), naive


@pytest.mark.parametrize("implementation", CPU_IMPLEMENTATIONS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kind", ["plain", "padding", "segments", "gqa", "longer", "extra",
                                  "extra_two_queries"])
def test_attention_matches_a_naive_reference(implementation, causal, kind):
  args, kwargs, naive = _attention_case(kind, causal)
  out = attention_lib.attention(*args, implementation=implementation, **kwargs)
  np.testing.assert_allclose(np.asarray(out), _naive_attention(**naive), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN attention needs a GPU")
@pytest.mark.parametrize("kind", ["plain", "padding", "gqa", "extra", "extra_two_queries"])
def test_cudnn_attention_matches_a_naive_reference(kind):
  args, kwargs, naive = _attention_case(kind, causal=True)
  args = [a if a is None or a.dtype == bool else a.astype(jnp.bfloat16) for a in args]
  kwargs = {k: v.astype(jnp.bfloat16) if v.dtype != bool else v for k, v in kwargs.items()
            if k != "causal"}
  out = attention_lib.attention(*args, causal=True, implementation="cudnn", **kwargs)
  np.testing.assert_allclose(np.asarray(out, np.float32), _naive_attention(**naive),
                             rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("kind", ["padding", "extra_two_queries"])
@pytest.mark.parametrize("causal", [False, True])
def test_attention_implementations_have_the_same_gradients(kind, causal):
  args, kwargs, _ = _attention_case(kind, causal)
  q, k, v, mask = args
  w = jnp.asarray(np.random.default_rng(1).normal(size=q.shape), jnp.float32)

  def grads(implementation):
    f = lambda q, k, v: (w * attention_lib.attention(q, k, v, mask, implementation=implementation,
                                                     **kwargs)).sum()
    return jax.grad(f, argnums=(0, 1, 2))(q, k, v)

  for a, b in zip(grads("dot_product_attention"), grads("einsum")):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def test_auto_resolves_per_backend_and_bad_values_are_errors():
  assert jax.default_backend() == "cpu"
  assert attention_lib.resolve_implementation("auto") == "einsum"
  with pytest.raises(ValueError, match="attention"):
    attention_lib.resolve_implementation("flash")
  with pytest.raises(ValueError, match="GPU only"):
    attention_lib.resolve_implementation("cudnn")
  assert stack_lib.resolve_unroll(None, 12) == 12
  assert stack_lib.resolve_unroll(False, 12) == 1 and stack_lib.resolve_unroll(3, 12) == 3
  with pytest.raises(ValueError, match="unroll"):
    stack_lib.resolve_unroll(13, 12)
  # A program traced here for a TPU (vlpre.compile) makes a TPU run's choices.
  with platform.target("tpu"):
    assert attention_lib.resolve_implementation("auto") == "dot_product_attention"
    assert stack_lib.resolve_unroll(None, 12) == 1
  assert stack_lib.resolve_unroll(None, 12) == 12


# ------------------------------------------------------------------------------- the stack


def test_layer_groups_name_the_blocks():
  assert stack_lib.layer_groups(3, scan=False, layer_name="block") == [
      ("block_0", 0, 1, False), ("block_1", 1, 1, False), ("block_2", 2, 1, False)]
  assert stack_lib.layer_groups(3, scan=True, name="blocks") == [("blocks", 0, 3, True)]
  assert stack_lib.layer_groups(5, scan=True, groups=(2, 3)) == [
      ("layers_0to1", 0, 2, True), ("layers_2to4", 2, 3, True)]
  with pytest.raises(ValueError, match="sum"):
    stack_lib.layer_groups(5, scan=True, groups=(2, 2))


@pytest.mark.parametrize("remat", [False, "dots"])
def test_encoder_drop_path_is_off_in_eval_and_remat_keeps_the_output(remat):
  x_BxNxD = jnp.asarray(np.random.default_rng(0).normal(size=(8, 5, 16)), jnp.float32)
  plain = layers.Encoder(depth=3, num_heads=2, mlp_dim=32)
  params = nn.meta.unbox(plain.init(jax.random.key(0), x_BxNxD))["params"]
  dropped = plain.clone(drop_path=0.5, remat=remat)
  reference = plain.apply({"params": params}, x_BxNxD)
  np.testing.assert_allclose(dropped.apply({"params": params}, x_BxNxD), reference, atol=1e-6)
  train = dropped.apply({"params": params}, x_BxNxD, train=True,
                        rngs={"dropout": jax.random.key(1)})
  # Some of the 8 samples lose a residual branch in training; none does in eval.
  assert not np.allclose(train, reference, atol=1e-4)
