"""Fail fast (vlpre/check.py): one line per config mistake, before any model is built."""
import glob
import importlib.util
import os
import subprocess
import sys

import jax
import pytest

from vlpre import check
from vlpre import methods
from vlpre.llm import assets

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "configs", "*.py")))


def load_config(name, arg=None):
  spec = importlib.util.spec_from_file_location(f"{name}_config",
                                                os.path.join(ROOT, "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def only_problem(config, **kwargs):
  """The single problem `check_config` finds; every problem is one line."""
  problems = check.check_config(config, **kwargs)
  assert len(problems) == 1, problems
  assert "\n" not in problems[0]
  return problems[0]


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("arg", [None, "tiny"])
def test_shipped_configs_check_clean(name, arg, data_dir):
  config = load_config(name, arg)
  if name == "lcl" and not os.path.exists(config.input.documents):
    # LCL's documented first step builds its interleaved set from the Flickr8k shards.
    from vlpre.data import interleaved  # pylint: disable=g-import-not-at-top
    interleaved.build_flickr_interleaved(data_dir, config.input.documents)
  problems = check.check_config(config)
  if (name, arg) == ("gpt4image", None):  # the paper's ImageNet recipe: no ImageNet shards here
    assert problems and all("'imagenet/" in p for p in problems), problems
  else:
    assert problems == []


def test_unknown_loss():
  c = load_config("clip", "tiny")
  c.losses = {"clipp": 1.0}
  assert only_problem(c).startswith("losses: unknown loss 'clipp'; known: ")


def test_unknown_evaluator_kind():
  c = load_config("clip", "tiny")
  c.evals.zeroshot_cifar10.kind = "zeroshott"
  line = only_problem(c)
  assert line.startswith("evals.zeroshot_cifar10.kind: no evaluator kind 'zeroshott'")
  kinds = line.split("kinds: ", 1)[1].split(", ")  # the kinds that exist, sorted
  assert kinds == sorted(kinds) and {"retrieval", "zeroshot", "sugarcrepe"} <= set(kinds)
  c.evals.zeroshot_cifar10.kind = "common"  # a helper file, not an evaluator
  assert "no evaluator kind 'common'" in only_problem(c)


def test_unknown_model_name():
  c = load_config("clip", "tiny")
  c.model_name = "two_towers"
  names = ", ".join(methods.folder_names())  # every folder, found, not listed here
  assert "two_tower" in names and "lift" in names
  assert only_problem(c) == ("model_name: no method 'two_towers': expected a folder vlpre/methods/two_towers/ "
                             f"(methods: {names}) or a module path 'mypkg.mymethod'")


def test_missing_eval_split():
  c = load_config("clip", "tiny")
  c.evals.linear_probe_cifar10.test_data = "cifar100/test-*.tar"
  assert only_problem(c).startswith(
      "evals.linear_probe_cifar10.test_data: shard pattern 'cifar100/test-*.tar' matches no file")
  c = load_config("clip", "tiny")
  c.evals.zeroshot_cifar10.classnames = "cifar100"
  assert only_problem(c).startswith("evals.zeroshot_cifar10.classnames: ")


def test_unreadable_train_data(tmp_path):
  c = load_config("clip", "tiny")
  c.input.train = "flickr30k/train-*.tar"
  assert only_problem(c).startswith("input.train: shard pattern 'flickr30k/train-*.tar' matches no file")
  (tmp_path / "train-00000.tar").write_bytes(b"<html>403 Forbidden</html>\n" * 100)
  c.input.train = str(tmp_path / "train-*.tar")
  line = only_problem(c)
  assert line.startswith("input.train: ") and "bad tar header at byte 0" in line


def test_a_record_of_each_train_pattern_decodes(data_dir, tmp_path):
  """A wrong caption field, image key or label is caught before training, in one line
  naming the pattern, the shard and the fields to check."""
  c = load_config("clip", "tiny")
  c.input.caption_field = "caption"
  line = only_problem(c)
  assert line.startswith("input.train: ") and "flickr8k/train-00000.tar" in line
  assert "check input.image_key and input.caption_field" in line
  assert "no field 'caption'" in line
  c = load_config("clip", "tiny")
  c.input.image_key = "png"
  assert "no image member among ('png',)" in only_problem(c)
  c = load_config("clip", "tiny")
  c.input.label = True  # captions, no .cls members
  assert "check input.image_key and input.label" in only_problem(c)
  # Several patterns: each is decoded; the problem names the one that fails.
  from tests import helpers  # pylint: disable=g-import-not-at-top
  shard = helpers.small_shard(data_dir, tmp_path, num_samples=2)
  cifar = os.path.join(data_dir, "cifar10", "test-00000.tar")  # labels, no captions
  c = load_config("clip", "tiny")
  with c.input.ignore_type():
    c.input.train = (shard, cifar)
  line = only_problem(c)
  assert line.startswith(f"input.train {cifar!r}: ") and "no json or txt member" in line
  with c.input.ignore_type():
    c.input.train = (shard,)
  assert check.check_config(c) == []


def test_other_data_kinds_need_a_method_that_builds_its_records():
  c = load_config("clip", "tiny")
  c.input.kind = "interleaved"
  assert only_problem(c).startswith(
      "input.kind: unknown data kind 'interleaved'; use 'tar' or 'tfds' (method ")
  lcl = load_config("lcl", "tiny")  # LCL builds its records: the kind is fine, its fields checked
  lcl.input.documents = "nowhere/*.jsonl"
  assert only_problem(lcl).startswith("input.documents: ")


def test_batch_not_divisible():
  c = load_config("clip", "tiny")
  c.batch_size = 30
  assert only_problem(c).startswith("batch_size: 30 is not divisible by the 8 data-parallel devices")
  c.batch_size = 64  # data = -1 on 6 devices: 64 does not split 6 ways
  assert only_problem(c, devices=jax.devices()[:6]).startswith(
      "batch_size: 64 is not divisible by the 6 data-parallel devices")


def test_mesh_does_not_divide_devices():
  c = load_config("clip", "tiny")
  c.mesh = (("data", -1), ("fsdp", 4), ("tensor", 1))
  assert check.check_config(c) == []
  assert only_problem(c, devices=jax.devices()[:6]).startswith(
      "mesh: mesh {'data': -1, 'fsdp': 4, 'tensor': 1} does not divide the 6 available devices")


def test_unknown_and_undownloadable_llm_names():
  c = load_config("lift", "tiny")
  c.text_encoder.name = "smollm3-135m"  # a typo: neither packaged, nor a path, nor a hub id
  assert only_problem(c).startswith("text_encoder.name: model 'smollm3-135m': not a packaged asset")
  c.text_encoder.name = "HuggingFaceTB/SmolLM2-360M"
  line = only_problem(c)
  assert "hub is off: set text_encoder.allow_download=True and pin text_encoder.revision" in line
  c.text_encoder.allow_download = True
  assert "unpinned: set text_encoder.revision" in only_problem(c)
  c.text_encoder.revision = "a" * 40
  assert check.check_config(c) == []  # allowed and pinned (not fetched by the check)
  c = load_config("bridge", "tiny")
  c.bridge.llm.name = "no-such-llm"
  assert only_problem(c).startswith("bridge.llm.name: model 'no-such-llm'")
  c.bridge.llm.name = "HuggingFaceTB/SmolLM2-360M"  # an LLM section's own download fields
  assert "set bridge.llm.allow_download=True and pin bridge.llm.revision" in only_problem(c)
  c.bridge.llm.update(allow_download=True, revision="a" * 40)
  assert check.check_config(c) == []


def test_a_text_encoder_may_name_a_saved_recipe(tmp_path, monkeypatch):
  """`lift.py:tiny,tuned` names a recipe saved under $VLPRE_TEXT_ENCODERS: found, the config
  checks clean; missing, the one line says where recipes are looked up."""
  monkeypatch.setenv("VLPRE_TEXT_ENCODERS", str(tmp_path))
  c = load_config("lift", "tiny,tuned")
  line = only_problem(c)
  assert line.startswith(f"text_encoder.name: model '{c.text_encoder.name}': not a packaged")
  assert line.endswith(f"nor a text-encoder recipe saved under {tmp_path} ($VLPRE_TEXT_ENCODERS)")
  (tmp_path / c.text_encoder.name).mkdir()
  (tmp_path / c.text_encoder.name / "text_encoder.json").write_text(
      '{"template": "{text}", "pooling": "last", "causal": true, "append_eos": false}')
  assert check.check_config(c) == []
  c = load_config("bridge", "tiny")  # an LLM section takes no recipe name
  c.bridge.llm.name = "smollm2-flickr8k-long"
  assert "recipe" not in only_problem(c)


def test_resolve_never_downloads_unless_allowed_and_pinned():
  with pytest.raises(assets.HubDownloadRefused, match="allow_download=True and pin revision"):
    assets.resolve("HuggingFaceTB/SmolLM2-360M")
  with pytest.raises(assets.HubDownloadRefused, match="unpinned"):
    assets.resolve("HuggingFaceTB/SmolLM2-360M", allow_download=True)
  with pytest.raises(FileNotFoundError, match="not a Hugging Face hub id"):
    assets.resolve("smollm3-135m")


def test_staged_configs_check_each_stage():
  c = load_config("clip", "tiny")
  c.stages = (dict(name="warm", steps=2), dict(name="big", steps=2, batch_size=30),
              dict(name="typo", steps=2, batchsize=32))
  assert check.check_config(c) == [
      "stages[1] (big): batch_size: 30 is not divisible by the 8 data-parallel devices "
      "(data × fsdp) of mesh {'data': 8, 'fsdp': 1, 'tensor': 1}",
      "stages[2] (typo): stages[2]: unknown config field 'batchsize'"]


def test_every_problem_at_once_one_line_each():
  c = load_config("clip", "tiny")
  c.losses = {"clipp": 1.0}
  c.model_name = "two_towers"
  c.batch_size = 30
  c.init_from = dict(workdir="/nonexistent/run", prefixes=("img",))
  problems = check.check_config(c)
  assert [p.split(":")[0] for p in problems] == ["model_name", "losses", "batch_size",
                                                 "init_from.workdir"]


@pytest.mark.integration
def test_main_check_flag(data_dir):
  """`python -m vlpre.main --check`: exit 1 with the problem's line, or 0 and "config OK"."""
  cmd = [sys.executable, "-m", "vlpre.main", "--check", "--config=configs/clip.py:tiny"]
  bad = subprocess.run(cmd + ["--config.model_name=two_towers"], cwd=ROOT, capture_output=True,
                       text=True, timeout=300, check=False)
  assert bad.returncode == 1, bad.stderr
  assert "Traceback" not in bad.stderr
  assert bad.stderr.strip().splitlines()[-1] == (
      "model_name: no method 'two_towers': expected a folder vlpre/methods/two_towers/ "
      f"(methods: {', '.join(methods.folder_names())}) or a module path 'mypkg.mymethod'")
  good = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
  assert good.returncode == 0, good.stderr
  assert good.stdout.strip() == "config OK"


def test_hive_stage_steps_option():
  """`configs/hive.py:tiny,stage_steps=...` (make compare's HIVE_STAGE_STEPS) sets the stages."""
  assert [s["steps"] for s in load_config("hive", "tiny").stages] == [100, 100, 100]
  assert [s["steps"] for s in load_config("hive", "tiny,stage_steps=30").stages] == [30, 30, 30]
  assert [s["steps"] for s in load_config("hive", "tiny,stage_steps=60/30/10").stages] == [60, 30, 10]
  for bad in ("30/30", "0", "x"):
    with pytest.raises(ValueError, match="stage_steps must be N or N/N/N"):
      load_config("hive", f"tiny,stage_steps={bad}")
