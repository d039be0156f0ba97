"""Hard negatives: the SugarCrepe-format evaluator and the swap / replace builder."""
import json
import os
import re
import tarfile

import numpy as np
import pytest

from tests import helpers
from vlpre import data
from vlpre import sharding
from vlpre import train_state
from vlpre.data import hard_negatives as hn
from vlpre.evaluators import common
from vlpre.evaluators import sugarcrepe


def _words(caption):
  return re.findall(r"[A-Za-z]+", caption.lower())


def test_preference_accuracy_against_a_naive_loop():
  rng = np.random.default_rng(0)
  img, pos, neg = (rng.normal(size=(50, 8)).astype(np.float32) for _ in range(3))
  pos[:5] = 3 * img[:5]  # a few certain hits, and scale must not matter
  hits = 0
  for i in range(50):
    cos = lambda a, b: a @ b / np.linalg.norm(a) / np.linalg.norm(b)
    hits += cos(img[i], pos[i]) > cos(img[i], neg[i])
  acc = sugarcrepe.preference_accuracy(img, pos, neg)
  assert acc == pytest.approx(hits / 50) and 0.1 < acc < 1
  assert sugarcrepe.preference_accuracy(img, neg, pos) == pytest.approx(1 - acc)  # no ties here
  assert sugarcrepe.preference_accuracy(img, pos, pos) == 0.0  # a tie is a miss


def test_swap_and_replace_rules_on_known_captions():
  assert hn.swap("A dog chases a cat .") == "A cat chases a dog ."
  assert hn.swap("Dog and ball") == "Ball and dog"  # capitalisation stays with the position
  assert hn.swap("two dogs and a cat in a red car") == "two dogs and a car in a red cat"
  assert hn.swap("a black dog on the white snow") == "a white dog on the black snow"  # colours
  assert hn.swap("a dog and another dog") is None and hn.swap("people walking") is None
  assert hn.swap("a dog with two cats") is None  # never a singular with a plural
  assert hn.replace("people walking", np.random.default_rng(0)) is None
  seen = set()
  for seed in range(40):
    negative = hn.replace("three dogs near a red car", np.random.default_rng(seed))
    before, after = _words("three dogs near a red car"), _words(negative)
    changed = [(b, a) for b, a in zip(before, after) if b != a]
    assert len(after) == len(before) and len(changed) == 1
    (old, new), = changed
    lists = [ws for ws in hn.WORD_LISTS.values() if old in ws]
    assert len(lists) == 1 and new in lists[0]  # plural stays plural, a number a number
    seen.add(old)
  assert seen == {"three", "dogs", "red", "car"}


def test_builder_on_flickr8k_val_follows_the_rules(data_dir):
  split = data.open_eval_split(dict(data="flickr8k/val-*.tar", data_dir=data_dir), captions=True)
  entries = hn.build(split.source)
  assert entries == hn.build(split.source)  # reproducible
  assert len(entries["swap"]) > 300 and len(entries["replace"]) > 900
  for rule, rule_entries in entries.items():
    assert len({e["filename"] for e in rule_entries.values()}) == len(rule_entries)  # 1 per image
    for e in rule_entries.values():
      pos, neg = _words(e["caption"]), _words(e["negative_caption"])
      assert e["negative_caption"] != e["caption"] and len(pos) == len(neg)
      changed = [i for i, (a, b) in enumerate(zip(pos, neg)) if a != b]
      if rule == "swap":
        i, j = changed
        assert (pos[i], pos[j]) == (neg[j], neg[i])
        assert hn._LIST_OF[pos[i]] == hn._LIST_OF[pos[j]]  # pylint: disable=protected-access
      else:
        i, = changed
        assert hn._LIST_OF[pos[i]] == hn._LIST_OF[neg[i]]  # pylint: disable=protected-access
  # Written in SugarCrepe's layout.
  assert set(next(iter(entries["swap"].values()))) == {"filename", "caption", "negative_caption"}


@pytest.mark.slow
def test_evaluator_end_to_end_on_a_tiny_clip(data_dir, tmp_path):
  shard = helpers.small_shard(data_dir, tmp_path, num_samples=16)
  entries = hn.build(data.TarShardSource(shard), per_image=2)
  paths = hn.write(entries, str(tmp_path / "negatives"))
  # The same entries by file name, with the images in a folder.
  folder = tmp_path / "images"
  os.makedirs(folder)
  with tarfile.open(shard) as tar:
    for m in tar:
      if m.name.endswith(".jpg"):
        (folder / m.name).write_bytes(tar.extractfile(m).read())
  os.makedirs(tmp_path / "by_name")
  for path in paths:
    with open(path) as f:
      renamed = {k: {**e, "filename": e["filename"] + ".jpg"} for k, e in json.load(f).items()}
    (tmp_path / "by_name" / os.path.basename(path)).write_text(json.dumps(renamed))

  config = helpers.tiny_clip_config(data_dir)
  example = {"image": np.zeros((16, 32, 32, 3), np.float32), "text": np.zeros((16, 16), np.int32),
             "text_mask": np.ones((16, 16), np.int32)}
  s = train_state.setup(config, example)
  predictor = common.Predictor(s, data.get_tokenizer("clip_bpe"))
  size = dict(image_size=32, resize_size=36, batch_size=16, max_text_len=16, data_dir=data_dir)
  with sharding.active(s.mesh, s.rules):
    by_key = sugarcrepe.Evaluator("hn", dict(data=str(tmp_path / "negatives/*.json"),
                                             images=shard, **size), predictor).run(s.variables())
    by_name = sugarcrepe.Evaluator("hn", dict(data=str(tmp_path / "by_name/*.json"),
                                              images=str(folder), **size), predictor)
    from_folder = by_name.run(s.variables())
    built = sugarcrepe.Evaluator("hn", dict(negatives_from=shard, per_image=2, images=shard,
                                            **size), predictor).run(s.variables())
    # Naive: embed each entry's image and both captions alone, compare the cosines.
    naive = {}
    for rule, rule_entries in entries.items():
      hits = []
      for e in rule_entries.values():
        batch = next(common.eval_batches(size, sugarcrepe.ImageFiles(str(folder), [e["filename"] + ".jpg"])))
        img = predictor.image_embeddings(s.variables(), [batch])["zimg"][0]
        pos, neg = predictor.text_embeddings(s.variables(), [e["caption"], e["negative_caption"]],
                                             16, batch_size=16)
        cos = lambda a, b: a @ b / np.linalg.norm(a) / np.linalg.norm(b)
        hits.append(cos(img, pos) > cos(img, neg))
      naive[f"hn/{rule}"] = np.mean(hits)
  assert sorted(by_key) == ["hn/mean", "hn/replace", "hn/swap"]
  assert by_key == from_folder == built  # the files, or the same negatives made in memory
  for k, v in naive.items():
    assert by_key[k] == pytest.approx(v, abs=1e-9)
  assert by_key["hn/mean"] == pytest.approx((naive["hn/swap"] + naive["hn/replace"]) / 2)


def test_bad_inputs_are_clear_errors(data_dir, tmp_path):
  (tmp_path / "broken.json").write_text('{"0": {"filename": "a"')
  with pytest.raises(ValueError, match="broken.json: not valid JSON"):
    sugarcrepe.load_entries(str(tmp_path / "broken.json"))
  (tmp_path / "list.json").write_text("[]")
  with pytest.raises(ValueError, match="expected a JSON dict"):
    sugarcrepe.load_entries(str(tmp_path / "list.json"))
  (tmp_path / "field.json").write_text(json.dumps({"7": {"filename": "a", "caption": "b"}}))
  with pytest.raises(ValueError, match="entry '7' must hold the strings"):
    sugarcrepe.load_entries(str(tmp_path / "field.json"))
  good = tmp_path / "good"
  os.makedirs(good)
  (good / "x.json").write_text(json.dumps(
      {"0": {"filename": "nope.jpg", "caption": "a dog", "negative_caption": "a cat"}}))
  cfg = dict(data=str(good / "x.json"), image_size=32, data_dir=data_dir)
  with pytest.raises(FileNotFoundError, match="1 image.s. not found by key .* 'nope.jpg'"):
    sugarcrepe.Evaluator("hn", dict(cfg, images="flickr8k/val-*.tar"), None)
  with pytest.raises(FileNotFoundError, match="missing from"):
    sugarcrepe.Evaluator("hn", dict(cfg, images=str(tmp_path)), None)
  with pytest.raises(FileNotFoundError, match="matches no file"):
    sugarcrepe.Evaluator("hn", dict(cfg, data=str(good / "*.jsonl"), images=str(tmp_path)), None)
  with pytest.raises(ValueError, match="give either data .* or negatives_from"):
    sugarcrepe.Evaluator("hn", dict(cfg, images=str(tmp_path), negatives_from="flickr8k/val-*.tar"),
                         None)
  with pytest.raises(ValueError, match="give either data"):
    sugarcrepe.Evaluator("hn", dict(image_size=32, images=str(tmp_path)), None)
  from vlpre import check
  problems = check._check_evals({"evals": {"hn": dict(  # pylint: disable=protected-access
      kind="sugarcrepe", data=str(good / "x.json"), images=str(tmp_path / "none-*.tar"))}})
  assert len(problems) == 1 and problems[0].startswith("evals.hn.images: ")
  problems = check._check_evals({"evals": {"hn": dict(  # pylint: disable=protected-access
      kind="sugarcrepe", negatives_from=str(tmp_path / "none-*.tar"), images=str(tmp_path))}})
  assert len(problems) == 1 and problems[0].startswith("evals.hn.negatives_from: ")


@pytest.mark.parametrize("spec", ["configs/clip.py:tiny,hard_negatives",
                                  "configs/lift.py:tiny,hard_negatives"])
def test_configs_add_the_flickr8k_negatives_on_request(spec, data_dir):
  from vlpre import check, config_lib
  config = config_lib.load(spec)
  assert config.evals.hard_negatives_flickr8k.negatives_from == "flickr8k/val-*.tar"
  assert "hard_negatives_flickr8k" not in config_lib.load(spec.rsplit(",", 1)[0]).evals
  assert not check._check_evals(config)  # pylint: disable=protected-access
