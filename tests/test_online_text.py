"""Online LIFT's trimmed text padding: the frozen encoder's embeddings are those of the
untrimmed batch, the step compiles once per length bucket, and the trainer logs how long
each step waited for its batch."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from vlpre import llm as llm_lib
from vlpre import metrics, train
from vlpre.data import text_batching
from vlpre.methods.lift import model as lift
from vlpre.text_encoders import PooledTextEncoder

from tests import helpers

CONFIG = llm_lib.DecoderConfig(vocab_size=23, hidden_size=32, intermediate_size=48,
                               num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                               rope_theta=1e4, rms_norm_eps=1e-6)
PREFIX, SUFFIX = [3, 4, 5], [6, 7]  # a template around the text (PromptEOL-like)


def _batch(lengths, width=77, seed=0, template=False):
  """Right-padded rows: real tokens (optionally inside the template), then pad id 0."""
  rng = np.random.default_rng(seed)
  ids = np.zeros((len(lengths), width), np.int32)
  mask = np.zeros((len(lengths), width), np.int32)
  for i, n in enumerate(lengths):
    row = list(rng.integers(8, CONFIG.vocab_size, n))
    row = PREFIX + row + SUFFIX if template else row
    ids[i, :len(row)], mask[i, :len(row)] = row, 1
  return {"text": ids, "text_mask": mask, "image": np.zeros((len(lengths), 2), np.float32)}


def test_buckets_are_few_and_hold_the_longest_row():
  assert text_batching.length_buckets(77) == (16, 32, 48, 64, 77)
  assert text_batching.length_buckets(256) == (16, 32, 48, 64, 96, 128, 192, 256)
  assert text_batching.length_buckets(12) == (12,)
  trim = text_batching.TrimTextPadding()
  for longest, width in ((1, 16), (17, 32), (33, 48), (64, 64), (65, 77), (77, 77)):
    out = trim(_batch([longest, 2], width=77))
    assert out["text"].shape == out["text_mask"].shape == (2, width), longest
    assert out["image"].shape == (2, 2)  # other keys untouched
  # Explicit buckets: those below the batch's width, then the width itself.
  assert text_batching.TrimTextPadding((8, 40, 100)).buckets_for(77) == (8, 40, 77)
  # A column used by any row is kept, whatever the padding side.
  left = {"text_mask": np.array([[0, 0, 1, 1] + [0] * 20])}
  assert text_batching.TrimTextPadding((2, 4)).__call__(left)["text_mask"].shape == (1, 4)


@pytest.mark.parametrize("causal,pooling,template", [
    (True, "last", False), (True, "last", True), (True, "eos", False), (True, "mean", False),
    (False, "mean", False), (False, "cls", False), (False, "last", True)])
@pytest.mark.slow
def test_trimmed_embeddings_equal_the_untrimmed_ones(causal, pooling, template):
  encoder = PooledTextEncoder(backbone=llm_lib.Decoder(CONFIG, causal=causal), pooling=pooling,
                              normalize=True, eos_id=SUFFIX[-1])
  full = _batch([3, 9, 20, 1], template=template)
  params = nn.meta.unbox(encoder.init(jax.random.key(0), full["text"][:, :8],
                                      full["text_mask"][:, :8]))
  trimmed = text_batching.TrimTextPadding()(full)
  assert trimmed["text"].shape[1] == 32 < full["text"].shape[1]
  apply = jax.jit(encoder.apply)
  a = apply(params, full["text"], full["text_mask"])
  b = apply(params, trimmed["text"], trimmed["text_mask"])
  np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_the_number_of_compiled_variants_stays_bounded():
  encoder = PooledTextEncoder(backbone=llm_lib.Decoder(CONFIG), pooling="last")
  params = nn.meta.unbox(encoder.init(jax.random.key(0), jnp.ones((1, 4), jnp.int32),
                                      jnp.ones((1, 4), jnp.int32)))
  apply = jax.jit(encoder.apply)
  trim = text_batching.TrimTextPadding()
  rng = np.random.default_rng(1)
  widths = set()
  for seed in range(24):
    batch = trim(_batch(rng.integers(1, 78, size=4), seed=seed))
    widths.add(batch["text"].shape[1])
    apply(params, batch["text"], batch["text_mask"])
  assert widths <= set(text_batching.length_buckets(77))
  assert apply._cache_size() == len(widths) <= 5  # pylint: disable=protected-access


def test_online_lift_trims_unless_told_not_to():
  config = ml_collections.ConfigDict({"text_mode": "online", "text_encoder": {"max_len": 77}})
  trim = lift.input_extras(config).batch_transform
  assert trim(_batch([5, 30]))["text"].shape == (2, 32)
  config.text_encoder.length_buckets = (40,)
  assert lift.input_extras(config).batch_transform(_batch([5, 30]))["text"].shape == (2, 40)
  config.text_encoder.trim_padding = False
  assert lift.input_extras(config).batch_transform is None


@pytest.mark.integration
def test_data_wait_is_logged_in_metrics_jsonl(tmp_path, data_dir):
  config = helpers.tiny_clip_config(data_dir, total_steps=2)
  config.evals = {}
  workdir = str(tmp_path / "run")
  train.run(config, workdir)
  rows = [r for r in metrics.read_metrics(workdir) if "loss" in r]
  assert [r["step"] for r in rows] == [1, 2]
  for r in rows:
    assert 0.0 <= r["perf/data_wait_seconds"] < 600.0
