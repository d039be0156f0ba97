"""Captioning scores against coco-caption's own scorers (pycocoevalcap) and hand-worked cases."""
import importlib
import json
import os
import random
import shutil
import subprocess
import tarfile

import pytest

from vlpre.evaluators import caption_metrics as cm

NUM_IMAGES = 300


def flickr_val_captions(data_dir, limit=None):
  """{key: [5 captions]} of the Flickr8k val shard, in shard order."""
  out = {}
  with tarfile.open(os.path.join(data_dir, "flickr8k", "val-00000.tar")) as tar:
    for member in tar:
      if member.name.endswith(".json"):
        out[member.name[:-len(".json")]] = json.load(tar.extractfile(member))["captions"]
        if limit and len(out) == limit:
          break
  return out


def tokenised(captions):
  return {key: [" ".join(cm.tokenize(c)) for c in caps] for key, caps in captions.items()}


def coco_scores(candidates, references):
  """BLEU-1..4 and CIDEr from pycocoevalcap, on the same tokenised text."""
  bleu_mod = importlib.import_module("pycocoevalcap.bleu.bleu")
  cider_mod = importlib.import_module("pycocoevalcap.cider.cider")
  res = {key: [c] for key, c in candidates.items()}
  gts = {key: list(r) for key, r in references.items()}
  bleus, _ = bleu_mod.Bleu(4).compute_score(gts, res, verbose=0)
  cider, _ = cider_mod.Cider().compute_score(gts, res)
  return bleus, float(cider)


@pytest.mark.parametrize("pairing", ["matched", "shuffled", "short"])
def test_bleu_and_cider_equal_pycocoevalcap(data_dir, pairing):
  caps = tokenised(flickr_val_captions(data_dir, NUM_IMAGES))
  keys = list(caps)
  references = {key: caps[key][1:] for key in keys}
  if pairing == "matched":      # caption 0 of each image against its other four
    candidates = {key: caps[key][0] for key in keys}
  elif pairing == "shuffled":   # another image's caption: few matches, scores near 0
    donors = keys[:]
    random.Random(0).shuffle(donors)
    candidates = {key: caps[donor][0] for key, donor in zip(keys, donors)}
  else:                         # truncated captions: the brevity penalty and δ < 0 matter
    candidates = {key: " ".join(caps[key][0].split()[:1 + i % 5]) for i, key in enumerate(keys)}
  expected_bleu, expected_cider = coco_scores(candidates, references)
  assert cm.bleu(candidates, references) == pytest.approx(expected_bleu, rel=1e-9, abs=1e-12)
  assert cm.cider(candidates, references) == pytest.approx(expected_cider, rel=1e-9, abs=1e-12)


def test_identical_candidate_scores_one():
  refs = {"a": ["a dog runs across the grass", "two dogs play"], "b": ["a man rides a red bike"]}
  cands = {"a": "a dog runs across the grass", "b": "a man rides a red bike"}
  assert cm.bleu(cands, refs) == pytest.approx([1.0] * 4, abs=1e-9)


def test_bleu_worked_example():
  # the cat sat on the mat / the cat is on the mat: clipped matches 5/6, 3/5, 1/4, 0/3,
  # equal lengths (no penalty); BLEU-2 = sqrt(1/2), BLEU-3 = (1/8)^(1/3), BLEU-4 ~ 0.
  b1, b2, b3, b4 = cm.bleu({0: "the cat sat on the mat"}, {0: ["the cat is on the mat"]})
  assert (b1, b2, b3) == pytest.approx((5 / 6, 0.5 ** 0.5, 0.5), abs=1e-8)
  assert b4 < 1e-3


def test_bleu_brevity_penalty_and_closest_length():
  # 2 words against a 6-word reference: every n-gram matches, penalty exp(1 - 6/2).
  b1, b2, _, _ = cm.bleu({0: "the cat"}, {0: ["the cat sat on the mat"]})
  assert (b1, b2) == pytest.approx((2.718281828459045 ** -2,) * 2, rel=1e-8)
  # Length 3 is as close to 2 as to 4: the shorter reference counts, so no penalty.
  assert cm.bleu({0: "a b c"}, {0: ["a b", "a b c d"]})[0] == pytest.approx(1.0, abs=1e-9)


def test_cider_worked_examples():
  # Two images, each candidate equal to its one reference. log(N)=log 2; "a" is in both
  # images (idf 0), every other n-gram in one: orders 1-3 have cosine 1, order 4 has no
  # n-gram (0); mean over orders 3/4, x10 = 7.5.
  refs = {"x": ["a dog runs"], "y": ["a cat sits"]}
  assert cm.cider({"x": "a dog runs", "y": "a cat sits"}, refs) == pytest.approx(7.5, abs=1e-12)
  # Swapped: only "a" matches, and its idf is 0.
  assert cm.cider({"x": "a cat sits", "y": "a dog runs"}, refs) == 0.0
  # One image: every reference n-gram has df = N, so every weight is 0.
  assert cm.cider({"x": "a dog runs"}, {"x": ["a dog runs"]}) == 0.0


def test_score_tokenises_first():
  refs = {1: ["A Dog's ball.", "the dog ( brown ) plays"], 2: ["Two men, running."]}
  raw = cm.score({1: "a dog 's ball", 2: "two men running ."}, refs)
  tok = {1: ["a dog 's ball", "the dog -lrb- brown -rrb- plays"], 2: ["two men running"]}
  assert raw == {"bleu4": cm.bleu({1: "a dog 's ball", 2: "two men running"}, tok)[3],
                 "cider": cm.cider({1: "a dog 's ball", 2: "two men running"}, tok)}


def test_mismatched_keys_raise():
  with pytest.raises(ValueError, match="same keys"):
    cm.bleu({1: "a"}, {2: ["a"]})


@pytest.mark.parametrize("text,tokens", [
    ("A man's dog, in a T-shirt (red), can't stop!", "a man 's dog in a t-shirt -lrb- red -rrb- ca n't stop"),
    ('He said "hi"... at 3.5 mph; 10,000 people.', "he said hi at 3.5 mph 10,000 people"),
    ("The U.S. team -- and Dr. Who -- cannot win.", "the u.s. team and dr. who can not win"),
    ("three kids ' toys at the dog 's bowl", "three kids toys at the dog 's bowl"),
])
def test_tokenize_cases(text, tokens):
  assert " ".join(cm.tokenize(text)) == tokens


@pytest.mark.integration
@pytest.mark.skipif(shutil.which("java") is None, reason="needs java for Stanford's PTBTokenizer")
def test_tokenize_equals_coco_ptbtokenizer(data_dir, tmp_path):
  ptb = importlib.import_module("pycocoevalcap.tokenizer.ptbtokenizer")
  captions = [c for caps in flickr_val_captions(data_dir).values() for c in caps]
  source = tmp_path / "captions.txt"
  source.write_text("\n".join(c.replace("\n", " ") for c in captions))
  jar = os.path.join(os.path.dirname(ptb.__file__), ptb.STANFORD_CORENLP_3_4_1_JAR)
  lines = subprocess.run(
      ["java", "-cp", jar, "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines",
       "-lowerCase", str(source)], capture_output=True, check=True, text=True).stdout.split("\n")
  expected = [[w for w in line.rstrip().split(" ") if w not in ptb.PUNCTUATIONS] for line in lines]
  mismatches = [(c, e) for c, e in zip(captions, expected) if cm.tokenize(c) != e]
  assert len(lines) >= len(captions) and not mismatches, mismatches[:5]
