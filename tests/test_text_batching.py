"""Length-bucketed text batches: every row once, and the same embeddings as full padding."""
import jax
import numpy as np
import pytest

from vlpre import text_encoders
from vlpre.data import text_batching

CAPTIONS = ["A dog .", "A black dog is running through the tall green grass near a fence .",
            "Two children play on the beach at sunset while their parents watch from a bench .",
            "a man", "A girl in a pink dress climbs the stairs of a wooden playhouse ."]


def test_batches_cover_every_row_once_with_trimmed_padding():
  rng = np.random.default_rng(0)
  lengths = rng.integers(1, 77, size=50)
  mask = (np.arange(77)[None] < lengths[:, None]).astype(np.int32)
  ids = np.arange(50 * 77).reshape(50, 77) * mask
  seen = []
  for rows, ids_b, mask_b in text_batching.bucketed_batches(ids, mask, 16, multiple=16):
    seen.extend(rows.tolist())
    assert ids_b.shape[0] == 16 and (ids_b.shape[1] % 16 == 0 or ids_b.shape[1] == 77)
    np.testing.assert_array_equal(mask_b[:len(rows)].sum(1), lengths[rows])
    np.testing.assert_array_equal(ids_b[:len(rows)], ids[rows, :ids_b.shape[1]])
  assert sorted(seen) == list(range(50))


@pytest.mark.slow  # over 20 s on 2 cores
def test_bucketed_embeddings_equal_fully_padded_ones():
  encoder = text_encoders.load_text_encoder("minilm-l6", max_len=77)
  apply = jax.jit(lambda ids, mask: encoder.module.apply({"params": encoder.params}, ids, mask))
  ids, mask = encoder.tokenizer.encode_batch(CAPTIONS, 77)
  full = np.asarray(apply(ids, mask))
  bucketed = np.zeros_like(full)
  for rows, ids_b, mask_b in text_batching.bucketed_batches(ids, mask, 4, multiple=8):
    assert ids_b.shape[1] < 77
    bucketed[rows] = np.asarray(apply(ids_b, mask_b))[:len(rows)]
  np.testing.assert_allclose(bucketed, full, atol=2e-5)
