"""Tiny ViT, text towers and LLM decoders with fixed parameters, for tests/test_core.py.

Parameters come from each leaf's path (a crc32 seed), not from `init`, so the reference
outputs in tests/testdata/core_reference.npz depend only on the parameter tree and the
forward pass: a refactor that keeps both keeps every output.
"""
import dataclasses
import zlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vlpre import llm as llm_lib
from vlpre.nn.text import TextTransformer
from vlpre.nn.vit import ViT
from vlpre.sharding import tree_paths

LLM_CONFIG = llm_lib.DecoderConfig(vocab_size=11, hidden_size=32, intermediate_size=48,
                                   num_layers=3, num_heads=4, num_kv_heads=2, head_dim=8,
                                   rope_theta=1e4, rms_norm_eps=1e-6)
LLM_QK_NORM_WINDOW = dataclasses.replace(LLM_CONFIG, qk_norm=True, sliding_window=3)


def path_params(abstract):
  """Parameters of the tree's shapes, each leaf drawn from a seed of its path."""
  leaves, treedef = jax.tree_util.tree_flatten(nn.meta.unbox(abstract))
  values = []
  for path, leaf in zip(tree_paths(nn.meta.unbox(abstract)), leaves):
    rng = np.random.default_rng(zlib.crc32(path.encode()))
    values.append(jnp.asarray(0.3 * rng.standard_normal(leaf.shape), jnp.float32))
  return jax.tree_util.tree_unflatten(treedef, values)


def param_shapes(abstract):
  shapes = jax.tree.leaves(jax.tree.map(lambda x: tuple(x.shape), nn.meta.unbox(abstract)),
                           is_leaf=lambda x: isinstance(x, tuple))
  return dict(zip(tree_paths(nn.meta.unbox(abstract)), shapes))


def _image():
  return jnp.asarray(np.random.default_rng(0).normal(size=(2, 8, 8, 3)), jnp.float32)


def _text():
  ids = np.random.default_rng(1).integers(1, 50, (2, 6)).astype(np.int32)
  ids[1, 4:] = 0
  return jnp.asarray(ids)


def _ids():
  return jnp.asarray(np.random.default_rng(2).integers(0, 11, (2, 7)).astype(np.int32))


def _vit(scan, attention):
  return ViT(width=16, depth=2, mlp_dim=32, num_heads=2, patch_size=4, pool="map",
             scan=scan, attention=attention)


def _text_tower(scan, causal, attention):
  return TextTransformer(vocab_size=50, max_len=8, width=16, depth=2, mlp_dim=32, num_heads=2,
                         causal=causal, pool="last" if causal else "mean", scan=scan,
                         attention=attention)


def _extra_kv(layer_count, qk_norm):
  rng = np.random.default_rng(3)
  out = {}
  for layer in layer_count:
    mask = np.ones((2, 5), bool)
    mask[1, 3:] = False
    out[layer] = llm_lib.ExtraKV(
        k_BxSxGxK=jnp.asarray(rng.normal(size=(2, 5, 2, 8)), jnp.float32),
        v_BxSxGxK=jnp.asarray(rng.normal(size=(2, 5, 2, 8)), jnp.float32),
        mask_BxS=jnp.asarray(mask),
        positions_BxS=jnp.asarray(np.tile(np.arange(5), (2, 1))) if not qk_norm else None,
        q_norm_scale_BxK=(jnp.asarray(1 + 0.1 * rng.normal(size=(2, 8)), jnp.float32)
                          if qk_norm else None))
  return out


def cases():
  """{name: (module, init_fn(module), apply_fn(module, params) -> {output name: array})}."""
  out = {}
  for scan in (True, False):
    for attention in ("einsum", "dot_product_attention"):
      def vit_apply(m, p):
        enc = m.apply({"params": p}, _image(), method=m.encode)
        return {k: v for k, v in enc.items()}
      out[f"vit_scan{int(scan)}_{attention}"] = (
          _vit(scan, attention), lambda m: m.init(jax.random.key(0), _image()), vit_apply)
      for causal in (True, False):
        out[f"text_scan{int(scan)}_causal{int(causal)}_{attention}"] = (
            _text_tower(scan, causal, attention),
            lambda m: m.init(jax.random.key(0), _text()),
            lambda m, p: {"features": m.apply({"params": p}, _text())})

  segments = jnp.asarray([[1, 1, 1, 2, 2, 2, 0], [1, 1, 1, 1, 1, 0, 0]], jnp.int32)
  llm_init = lambda m: m.init(jax.random.key(0), _ids(), return_logits=True)
  for name, kwargs in {"scan": dict(scan=True), "noscan": dict(scan=False),
                       "groups": dict(scan=True, layer_groups=(1, 2)),
                       "bidir": dict(scan=True, causal=False)}.items():
    def llm_apply(m, p):
      res = {}
      o = m.apply({"params": p}, _ids(), segments, return_logits=True, return_all_hidden=True)
      res["hidden"], res["logits"], res["all_hidden"] = o.hidden, o.logits, o.all_hidden
      o = m.apply({"params": p}, _ids(), extra_kv=_extra_kv((1,), qk_norm=False))
      res["extra_rope"] = o.hidden
      o = m.apply({"params": p}, _ids(), extra_kv=_extra_kv((0, 2), qk_norm=True))
      res["extra_qknorm"] = o.hidden
      cache = llm_lib.init_cache(m.config, 2, 10, scan=m.scan, groups=m.layer_groups)
      o = m.apply({"params": p}, _ids()[:, :5], cache=cache)
      o = m.apply({"params": p}, _ids()[:, 5:6], cache=o.cache, return_logits="last")
      res["decode_logits"] = o.logits
      res["decode_k"] = o.cache["groups"][-1][0]
      o = m.apply({"params": p}, _ids(), deterministic=False,
                  rngs={"dropout": jax.random.key(7)})
      res["drop_path"] = o.hidden
      return res
    out[f"llm_{name}"] = (llm_lib.Decoder(LLM_CONFIG, drop_path=0.5, **kwargs), llm_init,
                          llm_apply)
  out["llm_qknorm_window"] = (
      llm_lib.Decoder(LLM_QK_NORM_WINDOW),
      llm_init, lambda m, p: {"hidden": m.apply({"params": p}, _ids(), segments).hidden})
  return out


def run(name):
  module, init, apply = cases()[name]
  abstract = jax.eval_shape(lambda: init(module))["params"]
  params = path_params(abstract)
  return param_shapes(abstract), {k: np.asarray(v) for k, v in apply(module, params).items()}


if __name__ == "__main__":  # writes the reference outputs; run on the code they pin.
  import pathlib
  import pprint
  arrays, goldens = {}, {}
  for case in cases():
    shapes, outputs = run(case)
    goldens[case] = shapes
    arrays.update({f"{case}/{k}": v for k, v in outputs.items()})
  np.savez_compressed(pathlib.Path(__file__).parent / "testdata" / "core_reference.npz", **arrays)
  pprint.pprint(goldens, width=110)
