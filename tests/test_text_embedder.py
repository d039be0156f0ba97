"""The text embedder (vlpre/methods/text_embedder): its loss against a naive reference,
low-rank adapters merged = unmerged, the bidirectional mask, its caption-pair records,
and the saved recipe round trip (tuned → saved → loaded by name → same embeddings).

A tiny random decoder saved as a Hugging Face folder (word-level tokenizer) stands in
for SmolLM2 in the fast tests; the integration test trains the real tiny config.
"""
import functools
import json
import os
import sys

from safetensors.numpy import save_file
from tokenizers import Tokenizer, models, pre_tokenizers
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import traverse_util

from vlpre import llm as llm_lib
from vlpre import methods
from vlpre.llm import checkpoints
from vlpre.methods.text_embedder import data
from vlpre.methods.text_embedder import losses as te_losses
from vlpre.methods.text_embedder import model as te_model
from vlpre.nn import attention as attention_lib
from vlpre.nn import lora
from vlpre.text_encoders import PooledTextEncoder
from vlpre.text_encoders import load_text_encoder
from vlpre.text_encoders import recipes
from vlpre.text_encoders import store as store_lib

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "configs"))
import text_embedder as te_config  # pylint: disable=g-import-not-at-top,wrong-import-position

CONFIG = llm_lib.DecoderConfig(vocab_size=40, hidden_size=32, intermediate_size=48,
                               num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                               rope_theta=1e4, rms_norm_eps=1e-6)
WORDS = ("a dog runs on the grass cat sleeps sofa two children play in park man rides bike "
         "street woman reads book this sentence means one word").split()


# ------------------------------------------------------------------------------ loss


def _naive_pair_infonce(za, zp, zn, scale):
  """Per-row loops: anchor i against every positive and every hard negative; positive i
  against every anchor."""
  b = len(za)
  candidates = list(zp) + [n for row in zn for n in row]
  forward = backward = 0.0
  for i in range(b):
    logits = np.array([scale * za[i] @ c for c in candidates], np.float64)
    forward += -(logits[i] - np.log(np.sum(np.exp(logits))))
    back = np.array([scale * zp[i] @ za[j] for j in range(b)], np.float64)
    backward += -(back[i] - np.log(np.sum(np.exp(back))))
  return 0.5 * (forward / b + backward / b)


@pytest.mark.parametrize("negatives", [0, 1, 2])
def test_pair_infonce_matches_naive_reference(negatives):
  rng = np.random.default_rng(negatives)
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  za, zp = unit(rng.normal(size=(5, 8))), unit(rng.normal(size=(5, 8)))
  zn = unit(rng.normal(size=(5, negatives, 8)))
  outputs = {"z_anchor": jnp.asarray(za, jnp.float32), "z_positive": jnp.asarray(zp, jnp.float32),
             "z_negative": jnp.asarray(zn, jnp.float32), "logit_scale": jnp.float32(20.0)}
  loss, metrics = te_losses.pair_infonce(outputs, {})
  np.testing.assert_allclose(loss, _naive_pair_infonce(za, zp, zn, 20.0), rtol=1e-5)
  assert 0.0 <= float(metrics["pair_accuracy"]) <= 1.0
  # Orthogonal pairs with anchor = positive: no loss, unless N hard negatives equal to
  # each positive make it one of 1 + N equal candidates: 0.5 · log(1 + N) (one direction).
  eye = np.eye(5, 8, dtype=np.float32)
  perfect = {"z_anchor": eye, "z_positive": eye, "z_negative": np.zeros((5, 0, 8), np.float32),
             "logit_scale": jnp.float32(20.0)}
  assert float(te_losses.pair_infonce(perfect, {})[0]) < 1e-6
  perfect["z_negative"] = eye[:, None].repeat(negatives, 1)
  np.testing.assert_allclose(te_losses.pair_infonce(perfect, {})[0],
                             0.5 * np.log(1 + negatives), atol=1e-5)


# ------------------------------------------------------------------------------ LoRA


def _init(module, length=6, seed=0):
  ids = jnp.zeros((1, length), jnp.int32)
  return nn.meta.unbox(jax.jit(module.init)(jax.random.key(seed), ids)["params"])


@pytest.mark.parametrize("layer_groups", [(), (1, 1)])
def test_lora_merged_equals_unmerged_and_starts_at_the_base(layer_groups):
  adapted = llm_lib.Decoder(CONFIG, lora_rank=4, lora_alpha=8.0, layer_groups=layer_groups)
  plain = adapted.clone(lora_rank=0)
  params = _init(adapted)
  flat = traverse_util.flatten_dict(params)
  adapters = [p for p in flat if p[-1] in (lora.A_NAME, lora.B_NAME)]
  assert len(adapters) == 2 * 7 * max(len(layer_groups), 1)  # q k v o gate up down per group
  ids_BxL = np.random.default_rng(0).integers(0, CONFIG.vocab_size, (2, 6)).astype(np.int32)
  # jitted: eagerly, each of the decoder's ops compiles on its own (seconds on XLA:CPU)
  hidden = lambda m, p: np.asarray(jax.jit(m.apply)({"params": p}, ids_BxL).hidden)
  # B starts at zero: the adapted decoder is the base decoder.
  np.testing.assert_allclose(hidden(adapted, params), hidden(plain, lora.merge(params, 8.0)),
                             atol=1e-6)
  # Trained adapters (random B): merged into the kernels, the plain decoder agrees.
  rng = np.random.default_rng(1)
  flat = {p: (rng.normal(size=v.shape).astype(np.float32) * 0.1 if p[-1] == lora.B_NAME else v)
          for p, v in flat.items()}
  trained = traverse_util.unflatten_dict(flat)
  merged = lora.merge(trained, 8.0)
  assert not any(p[-1] in (lora.A_NAME, lora.B_NAME) for p in traverse_util.flatten_dict(merged))
  np.testing.assert_allclose(hidden(plain, merged), hidden(adapted, trained), rtol=1e-5, atol=1e-5)
  assert not np.allclose(hidden(plain, merged), hidden(plain, lora.merge(params, 8.0)), atol=1e-3)


def test_params_to_state_dict_inverts_state_dict_to_params():
  module = llm_lib.Decoder(CONFIG, layer_groups=(1, 1))
  params = jax.tree.map(np.asarray, _init(module))
  state = checkpoints.params_to_state_dict(params)
  assert "model.layers.1.self_attn.q_proj.weight" in state
  shapes = jax.eval_shape(lambda: params)
  back = checkpoints.state_dict_to_params(state, shapes)
  jax.tree.map(np.testing.assert_array_equal, back, params)


# ------------------------------------------------------------------ bidirectional mask


def test_bidirectional_mask_sees_every_real_token_and_no_padding():
  segments_BxL = np.array([[1, 1, 1, 0], [1, 1, 0, 0]])
  slots_L = np.arange(4)
  positions_BxL = np.broadcast_to(slots_L, (2, 4))
  mask = np.asarray(attention_lib.segment_mask(segments_BxL, slots_L, positions_BxL,
                                               segments_BxL, slots_L, positions_BxL,
                                               causal=False, window=None))[:, 0]
  for b in range(2):
    for q in range(4):
      for k in range(4):
        real_q, real_k = segments_BxL[b, q] > 0, segments_BxL[b, k] > 0
        expected = real_q == real_k  # real sees real (also later ones); padding sees padding
        assert mask[b, q, k] == expected, (b, q, k)


def test_bidirectional_embedder_reads_later_tokens_and_ignores_padding():
  decoder = llm_lib.Decoder(CONFIG)
  params = {"backbone": _init(decoder)}
  ids_1xL = np.array([[5, 6, 7, 8, 0, 0]], np.int32)
  mask_1xL = np.array([[1, 1, 1, 1, 0, 0]], np.int32)
  changed_1xL = ids_1xL.copy()
  changed_1xL[0, 3] = 9  # the last real token
  pad_changed_1xL = ids_1xL.copy()
  pad_changed_1xL[0, 4:] = 3
  for causal in (True, False):
    encoder = PooledTextEncoder(backbone=decoder.clone(causal=causal), pooling="mean")
    embed = lambda ids, e=encoder: np.asarray(jax.jit(e.apply)({"params": params}, ids, mask_1xL))
    hidden = jax.jit(functools.partial(encoder.apply, method="hidden_states"))
    first = lambda ids, h=hidden: np.asarray(h({"params": params}, ids, mask_1xL))[0, 0]
    np.testing.assert_allclose(embed(pad_changed_1xL), embed(ids_1xL), atol=1e-6)
    assert np.allclose(first(changed_1xL), first(ids_1xL), atol=1e-6) == causal


# ---------------------------------------------------------------------------- records


SETS = [["a dog runs on the grass", "the dog runs", "dog on grass"],
        ["a cat sleeps on the sofa", "cat on sofa"],
        ["two dogs run on the grass", "dogs on grass", "two dogs"],
        ["a man rides a bike", "man on bike in the street"]]


def test_lexical_neighbours_are_the_closest_other_image():
  neighbours = data.lexical_neighbours(SETS, buckets=256)
  assert list(neighbours[[0, 2]]) == [2, 0]  # the two dog images
  assert all(neighbours != np.arange(len(SETS)))


class _WordTokenizer:
  def encode_batch(self, texts, max_len):
    ids = np.zeros((len(texts), max_len), np.int32)
    for i, text in enumerate(texts):
      words = [hash(w) % 97 + 1 for w in text.split()][:max_len]
      ids[i, :len(words)] = words
    return ids, (ids > 0).astype(np.int32)


def test_pairs_are_two_distinct_own_captions_redrawn_per_epoch():
  tok = _WordTokenizer()
  make = data.MakePair(SETS, data.lexical_neighbours(SETS, 256), tok, seed=0, epoch_len=4,
                       max_len=8)
  decoded = lambda r: [tuple(row) for row in r["text"]]
  own = {tuple(tok.encode_batch([c], 8)[0][0]) for c in SETS[0]}
  other = {tuple(tok.encode_batch([c], 8)[0][0]) for c in SETS[2]}
  draws = set()
  for epoch in range(6):
    record = make.map_with_index(epoch * 4, 0)
    anchor, positive, negative = decoded(record)
    assert anchor in own and positive in own and anchor != positive and negative in other
    assert record["text_mask"].shape == (3, 8)
    draws.add((anchor, positive))
    assert decoded(make.map_with_index(epoch * 4, 0)) == decoded(record)  # a rerun: same draw
  assert len(draws) > 1


# ---------------------------------------------------------------------- recipe round trip


def _tiny_base(folder):
  """A random 2-layer llama with a word-level tokenizer, as a Hugging Face folder."""
  from transformers import LlamaConfig, PreTrainedTokenizerFast  # pylint: disable=g-import-not-at-top  (heavy)
  vocab = {w: i for i, w in enumerate(["<eos>", "<unk>", ":", '"', *WORDS])}
  backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  backend.pre_tokenizer = pre_tokenizers.Whitespace()
  PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>",
                          pad_token="<eos>").save_pretrained(folder)
  hf = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=48,
                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                   max_position_embeddings=64, rms_norm_eps=1e-6, tie_word_embeddings=True,
                   eos_token_id=0, pad_token_id=0)
  hf.save_pretrained(folder)
  module = llm_lib.Decoder(llm_lib.DecoderConfig.from_hf(hf))
  save_file(checkpoints.params_to_state_dict(jax.tree.map(np.asarray, _init(module))),
            os.path.join(folder, "model.safetensors"))
  return str(folder)


def _embedder_config(base, *args):
  c = te_config.get_config(",".join(("tiny",) + args))
  c.llm.name = base
  c.input.max_text_len = 16
  return c


@pytest.mark.slow  # transformers' tokenizer and config classes, two compiled steps: ~25 s
def test_recipe_round_trip_tuned_saved_loaded_by_name(tmp_path, monkeypatch):
  monkeypatch.setenv("VLPRE_TEXT_ENCODERS", str(tmp_path / "recipes"))
  config = _embedder_config(_tiny_base(tmp_path / "base"), "bidir")
  built = methods.build(config)
  tokenizer = methods.build_tokenizer(config)
  texts = ["a dog runs on the grass", "the dog runs", "two children play in the park",
           "children play", "a cat sleeps on the sofa", "cat on sofa"]
  ids, mask = tokenizer.encode_batch(texts, 16)  # 3 pairs (anchor, positive)
  batch = {"text": ids.reshape(3, 2, 16), "text_mask": mask.reshape(3, 2, 16)}
  params = nn.meta.unbox(jax.jit(functools.partial(built.model.init, train=False))(
      jax.random.key(0), batch)["params"])
  flat = traverse_util.flatten_dict(params, sep="/")
  flat.update({k: jnp.asarray(v) for k, v in built.pretrained.items()})
  params = traverse_util.unflatten_dict(flat, sep="/")

  def loss_fn(p):
    return te_losses.pair_infonce(built.model.apply({"params": p}, batch), batch)[0]

  # Two steps on the adapters only (what config.trainable selects).
  tx = optax.masked(optax.adam(1e-3), jax.tree_util.tree_map_with_path(
      lambda path, _: "lora" in jax.tree_util.keystr(path), params))
  opt_state = tx.init(params)
  losses = []
  for _ in range(2):
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    losses.append(float(loss))
  assert losses[1] < losses[0]
  tuned = np.asarray(built.model.apply({"params": params}, ids, mask, method="embed_text"))

  llm = te_model.load_llm(config)
  saved = recipes.save(os.path.join(recipes.recipes_dir(), config.text_embedder.recipe),
                       params=lora.merge(params["encoder"]["backbone"], 16.0),
                       hf_config=llm.hf_config, tokenizer=llm.tokenizer,
                       **te_model.recipe_settings(config), tuned=te_model.tuned_settings(config))
  meta = json.loads(open(os.path.join(saved.directory, recipes.RECIPE_FILE)).read())
  assert meta["causal"] is False and meta["tuned"]["lora_rank"] == 8
  encoder = load_text_encoder(config.text_embedder.recipe, max_len=16)  # by name
  np.testing.assert_allclose(encoder.embed(texts), tuned, rtol=1e-5, atol=1e-5)
  base = load_text_encoder(config.llm.name, max_len=16, template=config.text_embedder.template)
  assert not np.allclose(base.embed(texts), tuned, atol=1e-4)  # the tuning changed them
  with pytest.raises(ValueError, match="tuned recipe"):
    load_text_encoder(config.text_embedder.recipe, max_len=16, pooling="mean")

  # The store's key holds the recipe's digest: a re-saved recipe is another store.
  lift = ml_collections.ConfigDict(dict(
      text_encoder=dict(name=config.text_embedder.recipe, max_len=16, template="", pooling=""),
      input=dict(caption_field="captions", train="x")))
  before = store_lib.encoder_settings(lift)
  assert before["recipe"] == saved.digest
  recipes.save(saved.directory, params=lora.merge(params["encoder"]["backbone"], 8.0),
               hf_config=llm.hf_config, tokenizer=llm.tokenizer,
               **te_model.recipe_settings(config), tuned={})
  assert store_lib.encoder_settings(lift)["recipe"] != before["recipe"]


# ------------------------------------------------------------------------ integration


@pytest.mark.integration
def test_tiny_config_trains_two_steps_and_saves_a_recipe_lift_scores(tmp_path, monkeypatch):
  from vlpre import train  # pylint: disable=g-import-not-at-top
  from vlpre.methods.lift import text_score  # pylint: disable=g-import-not-at-top
  from vlpre.methods.text_embedder import save  # pylint: disable=g-import-not-at-top
  monkeypatch.setenv("VLPRE_TEXT_ENCODERS", str(tmp_path / "recipes"))
  config = te_config.get_config("tiny,long")  # the run behind lift.py's `tuned`, cut short
  config.llm.num_layers = 2  # the packaged SmolLM2, truncated: the loop is what is tested
  config.batch_size, config.total_steps, config.log_every = 8, 2, 1
  config.checkpoint.every_steps = 2
  config.checkpoint["async"] = False
  config.input.max_text_len = 32
  metrics = train.run(config, str(tmp_path / "run"))
  assert np.isfinite(metrics["loss"])
  recipe = save.save_recipe(config, str(tmp_path / "run"))
  assert recipe.directory.endswith(config.text_embedder.recipe)
  sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "configs"))
  import lift as lift_config  # pylint: disable=g-import-not-at-top
  lift = lift_config.get_config("tiny,tuned")
  scores = text_score.score(lift, max_images=6)
  assert scores["num_captions"] == 30 and 0.0 <= scores["R@1"] <= 1.0
