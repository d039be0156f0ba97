"""Caption↔caption retrieval: the text-side score of a frozen encoder."""
import numpy as np
import pytest

from tests import helpers
from vlpre.methods.lift import text_score
from vlpre.text_encoders import store as store_lib


def test_caption_retrieval_matches_naive_reference():
  rng = np.random.default_rng(0)
  owner = np.repeat(np.arange(6), 3)
  emb = rng.normal(size=(18, 5)) + 0.8 * rng.normal(size=(6, 5))[owner]
  for center in (False, True):
    z = emb - emb.mean(0) if center else emb
    z = z / np.linalg.norm(z, axis=1, keepdims=True)
    hits1, hits5 = [], []
    for q in range(18):
      others = sorted((j for j in range(18) if j != q), key=lambda j: -(z[q] @ z[j]))
      hits1.append(owner[others[0]] == owner[q])
      hits5.append(any(owner[j] == owner[q] for j in others[:5]))
    got = text_score.caption_retrieval(emb, owner, center=center)
    assert got == {"R@1": float(np.mean(hits1)), "R@5": float(np.mean(hits5))}


@pytest.mark.slow
def test_score_reads_flickr8k_val_captions_and_beats_chance(data_dir):
  config = helpers.tiny_clip_config(data_dir)
  config.text_encoder = dict(name="minilm-l6", max_len=32, pooling="", normalize=True,
                             template="{text}", layer=-1, dtype="float32")
  texts, owner = text_score.split_captions("flickr8k/val-*.tar", data_dir, max_images=30)
  assert len(texts) == 150 and np.bincount(owner).tolist() == [5] * 30
  result = text_score.score(config, max_images=30)
  assert result["num_captions"] == 150
  assert result["R@1"] > 5 * result["chance_R@1"]  # MiniLM sees which captions belong together
  assert store_lib.text_encoder(config).pooling == "mean"
