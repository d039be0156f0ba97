"""Tiny configurations shared by the end-to-end tests (real code paths, small sizes)."""
import copy

from vlpre import config_lib


def tiny_clip_config(data_dir, total_steps=4):
  c = config_lib.base("tiny")
  c.total_steps = total_steps
  c.batch_size = 16
  c.mesh = (("data", 2), ("fsdp", 4), ("tensor", 1))
  c.min_fsdp_size = 2**14  # small enough that the tiny towers' big weights must shard
  c.log_every = 1
  c.checkpoint.every_steps = 3
  c.optim.warmup_steps = 2
  c.input = config_lib.image_input("tiny", data_dir=data_dir, image_size=32, resize_size=36)
  c.tokenizer = dict(name="clip_bpe")
  c.model_name = "two_tower"
  c.model = dict(image=dict(width=64, depth=2, mlp_dim=128, num_heads=2, patch_size=8, pool="cls"),
                 text=dict(width=64, depth=2, mlp_dim=128, num_heads=2, max_len=16),
                 embed_dim=32)
  c.input.max_text_len = 16
  c.losses = {"clip": 1.0}
  size = dict(image_size=32, resize_size=36, batch_size=32, data_dir=data_dir, max_text_len=16)
  c.evals = dict(
      retrieval=dict(kind="retrieval", data="flickr8k/val-*.tar", max_examples=64, **size),
      zeroshot=dict(kind="zeroshot", data="cifar10/test-*.tar", classnames="cifar10",
                    max_examples=64, **size),
      probe=dict(kind="linear_probe", train_data="cifar10/train-*.tar",
                 test_data="cifar10/test-*.tar", num_classes=10, max_train_examples=96,
                 max_examples=64, **size))
  return c


def with_steps(config, total_steps):
  c = copy.deepcopy(config)
  c.total_steps = total_steps
  return c


def small_shard(data_dir, tmp_path, pattern="flickr8k/val-00000.tar", num_samples=16):
  """Copies the first `num_samples` samples of a real shard into tmp_path; returns its path."""
  import os
  import tarfile
  out = os.path.join(str(tmp_path), "small-00000.tar")
  keys = []
  with tarfile.open(os.path.join(data_dir, pattern)) as src, tarfile.open(out, "w") as dst:
    for member in src:
      key = member.name.split(".")[0]
      if key not in keys:
        if len(keys) == num_samples:
          break
        keys.append(key)
      dst.addfile(member, src.extractfile(member))
  return out


def stop_inside_stage(monkeypatch, stage_folder):
  """From now on, the `train.run` of a stage whose folder ends with `stage_folder` asks to
  stop after its first step, unless the stage has checkpoints already: the first run stops
  there (saving that step, as a SIGTERM would), a rerun resumes inside the stage."""
  import os
  from vlpre import train
  real_run = train.run

  def run_with_stop(cfg, directory, **kwargs):
    if directory.endswith(stage_folder) and not os.path.exists(os.path.join(directory, "checkpoints")):
      kwargs["on_step"] = lambda step: train.request_stop()
    return real_run(cfg, directory, **kwargs)

  monkeypatch.setattr(train, "run", run_with_stop)
