"""A checkpoint written before the method folders and the shared transformer core (commit
bbe7c2d: a tiny ViT classifier, 2 steps, saved at step 2) resumes on today's code and
continues exactly as a run that never stopped."""
import pathlib
import shutil

import jax
import numpy as np
import pytest

from vlpre import checkpoint, config_lib, metrics, train

FIXTURE = pathlib.Path(__file__).parent / "testdata" / "checkpoint_bbe7c2d"


def fixture_config(data_dir, total_steps):
  """The config that wrote the fixture (written out here, as it was then)."""
  c = config_lib.load("configs/gpt4image.py:tiny_vit")
  c.input.data_dir = data_dir
  c.text_loss_weight = 0.0
  c.model.vit.update(width=32, depth=2, mlp_dim=64, num_heads=2)
  c.batch_size = 16
  c.total_steps = total_steps
  c.checkpoint.every_steps = 2
  c.checkpoint.keep = 1
  c.log_every = 1
  c.evals = {}
  c.optim.warmup_steps = 1
  c.optim.lr = 1e-2
  c.mesh = (("data", 2), ("fsdp", 4), ("tensor", 1))
  return c


def _params(workdir):
  return checkpoint.restore_params(str(workdir), ("vit", "head"))


@pytest.mark.integration
def test_a_checkpoint_from_before_the_restructure_resumes_exactly(tmp_path, data_dir):
  old = tmp_path / "old"
  shutil.copytree(FIXTURE, old)
  before = _params(old)  # today's code reads every parameter the old code wrote
  train.run(fixture_config(data_dir, 4), str(old))
  rows = {r["step"]: r for r in metrics.read_metrics(str(old))}
  assert sorted(rows) == [1, 2, 3, 4]  # steps 1-2 from the fixture, 3-4 resumed

  straight = tmp_path / "straight"
  train.run(fixture_config(data_dir, 4), str(straight))
  fresh = {r["step"]: r for r in metrics.read_metrics(str(straight))}
  for step in (1, 2):  # today's code computes what the old code logged
    np.testing.assert_allclose(fresh[step]["loss"], rows[step]["loss"], rtol=1e-6)
    np.testing.assert_allclose(fresh[step]["grad_norm"], rows[step]["grad_norm"], rtol=1e-5)
  for step in (3, 4):
    np.testing.assert_allclose(fresh[step]["loss"], rows[step]["loss"], rtol=1e-6)
  after, reference = _params(old), _params(straight)
  # The old code's steps 1-2 and today's agree to float rounding (the losses above), but
  # Adam turns rounding in a near-zero gradient into an update of up to lr (1e-2) in
  # either direction; 1e-3 bounds that noise while a missing or misplaced step would not.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-3), after, reference)
  moved = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.abs(a - b).max()), after, before))
  assert max(moved) > 0  # the resumed steps trained
