"""Outlier-weight shares per block (bridge training's analysis)."""
import os

import numpy as np
import pytest

from vlpre.methods.bridge import analyze_outliers


def test_shares_match_a_naive_count_in_every_layout():
  rng = np.random.default_rng(0)
  kernels = [rng.normal(scale=0.6, size=(3, 8, 8)) for _ in range(2)]  # 3 blocks, 2 matrices
  stacked = {"layers": {"q": {"kernel": kernels[0]}, "up": {"kernel": kernels[1]},
                        "norm": {"scale": np.full((3, 8), 5.0)}},  # norms are not counted
             "embed_tokens": {"embedding": np.full((4, 8), 9.0)}}  # nor non-block weights
  unrolled = {f"layers_{i}": {"q": {"kernel": kernels[0][i]}, "up": {"kernel": kernels[1][i]}}
              for i in range(3)}
  grouped = {"layers_0to0": {"q": {"kernel": kernels[0][:1]}, "up": {"kernel": kernels[1][:1]}},
             "layers_1to2": {"q": {"kernel": kernels[0][1:]}, "up": {"kernel": kernels[1][1:]}}}
  vit = {"encoder": {"blocks": {"mlp": {"kernel": np.stack(kernels[0])},
                                "attn": {"kernel": np.stack(kernels[1])}}}}
  naive = [float(np.mean(np.abs(np.concatenate([k[i].ravel() for k in kernels])) > 1.0))
           for i in range(3)]
  for tree in (stacked, unrolled, grouped, vit):
    np.testing.assert_allclose(analyze_outliers.block_outlier_shares(tree), naive)
  assert analyze_outliers.block_outlier_shares(stacked, threshold=100.0) == [0.0] * 3


@pytest.mark.slow
def test_analyze_writes_table_and_plot_for_smollm2(tmp_path):
  rows = analyze_outliers.analyze(str(tmp_path), num_layers=2)
  (name, shares), = rows.items()
  assert name == "smollm2-135m (pretrained)" and len(shares) == 2
  assert all(0.0 <= s < 0.5 for s in shares)
  table = (tmp_path / "outliers.md").read_text()
  assert "| 0 |" in table and "| 1 |" in table
  assert os.path.getsize(tmp_path / "outliers.png") > 1000
