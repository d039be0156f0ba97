r"""Builds compositional hard negatives from a captioned split, in SugarCrepe's JSON format.

    python -m vlpre.data.hard_negatives --data='flickr8k/val-*.tar' \
        --out_dir=workdirs/data/flickr8k_val_negatives

writes `<out_dir>/swap.json` and `<out_dir>/replace.json`, each a JSON dict
id -> {"filename": <the image's sample key>, "caption": <a caption of the image>,
"negative_caption": <that caption changed by one rule>}, which the `sugarcrepe` evaluator
reads (with `images` = the same shards). Two rules, on whole words (case-insensitive; a
capitalised word stays capitalised):

  swap:    two different nouns of NOUNS, both singular or both plural, trade places
           ("a dog chases a cat" -> "a cat chases a dog"); where a caption has no such
           pair, two different colours of COLOURS do ("a black dog and a white cat" ->
           "a white dog and a black cat").
  replace: one word of NOUNS (keeping its number), COLOURS or NUMBERS, picked at random,
           becomes another word of the same list, picked at random ("a black dog" ->
           "a brown dog", "two dogs" -> "five dogs").

The word lists below are the documentation of what can change. They hold words that
are common in image captions and exclude near-synonyms and hypernyms of one another
(no "person", "child" or "bicycle" beside "man", "boy" and "bike"; no "grey" beside
"gray"), so that a negative is false of the image rather than a paraphrase. The rules
do not check that a negative is fluent or that it contradicts every reading of the
image: they are a cheap, reproducible probe of word order and binding, not a curated
benchmark.

Per image, the first `per_image` captions (in the split's order) that a rule applies
to give one entry each; the random choices are seeded by `seed` and the image key, so a
rebuild gives the same files. `--format`/`--split` read clip_benchmark folders and TFDS
splits as the evaluators do (`vlpre.data.open_eval_split`); the `sugarcrepe` evaluator
finds images by sample key in tar shards or by file name in a folder.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import zlib
from typing import Any

from absl import app
from absl import flags
from absl import logging
import numpy as np

from vlpre.data import eval_input
from vlpre.data import transforms as T

# Singular -> plural. Replacing keeps the number; swapping needs two of one number.
NOUNS = {
    "man": "men", "woman": "women", "boy": "boys", "girl": "girls", "dog": "dogs",
    "cat": "cats", "horse": "horses", "cow": "cows", "bird": "birds", "sheep": "sheep",
    "ball": "balls", "bike": "bikes", "car": "cars", "truck": "trucks", "boat": "boats",
    "tree": "trees", "rock": "rocks", "bench": "benches", "chair": "chairs",
    "table": "tables", "fence": "fences", "wall": "walls", "building": "buildings",
    "hat": "hats", "shirt": "shirts", "jacket": "jackets", "frisbee": "frisbees",
    "stick": "sticks", "toy": "toys", "umbrella": "umbrellas", "guitar": "guitars",
    "camera": "cameras",
}
SINGULAR = tuple(n for n, p in NOUNS.items() if n != p)  # "sheep": neither number is certain
PLURAL = tuple(p for n, p in NOUNS.items() if n != p)
COLOURS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black",
           "white", "gray")
NUMBERS = ("two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
WORD_LISTS = {"singular noun": SINGULAR, "plural noun": PLURAL, "colour": COLOURS,
              "number": NUMBERS}
_LIST_OF = {w: name for name, words in WORD_LISTS.items() for w in words}
_WORD = re.compile(r"[A-Za-z]+")


@dataclasses.dataclass(frozen=True)
class Word:
  text: str  # as written
  start: int
  end: int

  @property
  def lower(self) -> str:
    return self.text.lower()


def listed_words(caption: str) -> list[Word]:
  """The words of `caption` that are in one of WORD_LISTS, in order."""
  return [Word(m.group(), m.start(), m.end()) for m in _WORD.finditer(caption)
          if m.group().lower() in _LIST_OF]


def _cased(new: str, old: str) -> str:
  return new.capitalize() if old[:1].isupper() else new


def _substitute(caption: str, changes: dict[Word, str]) -> str:
  out, pos = [], 0
  for word in sorted(changes, key=lambda w: w.start):
    out += [caption[pos:word.start], _cased(changes[word], word.text)]
    pos = word.end
  return "".join(out + [caption[pos:]])


def swap(caption: str) -> str | None:
  """Two different nouns of one number trade places, else two different colours; None
  when the caption has neither pair."""
  words = listed_words(caption)
  for lists in (("singular noun", "plural noun"), ("colour",)):
    for kind in lists:
      of_kind = [w for w in words if _LIST_OF[w.lower] == kind]
      for i, a in enumerate(of_kind):
        b = next((w for w in of_kind[i + 1:] if w.lower != a.lower), None)
        if b is not None:
          return _substitute(caption, {a: b.lower, b: a.lower})
  return None


def replace(caption: str, rng: np.random.Generator) -> str | None:
  """One listed word (picked with `rng`) becomes another word of its list; None when the
  caption has no listed word."""
  words = listed_words(caption)
  if not words:
    return None
  word = words[int(rng.integers(len(words)))]
  others = [w for w in WORD_LISTS[_LIST_OF[word.lower]] if w != word.lower]
  return _substitute(caption, {word: others[int(rng.integers(len(others)))]})


def _rng(seed: int, key: str) -> np.random.Generator:
  return np.random.default_rng([seed, zlib.crc32(key.encode("utf-8"))])


def build(split: Any, *, per_image: int = 1, seed: int = 0) -> dict[str, dict[str, dict]]:
  """{"swap": entries, "replace": entries} for the records of `split` (a random-access
  source of captioned records); entries are SugarCrepe's id -> {filename, caption,
  negative_caption}."""
  parse = T.ParseCaption("captions", pick="all")
  out: dict[str, dict[str, dict]] = {"swap": {}, "replace": {}}
  num_bad = 0
  for index in range(len(split)):
    record = split[index]
    record = record if T.is_bad(record) else parse.map(record)
    if T.is_bad(record):
      num_bad += 1
      continue
    key, rng = record["__key__"], _rng(seed, record["__key__"])
    for rule, make in (("swap", swap), ("replace", lambda c: replace(c, rng))):
      made = 0
      for caption in record["captions"]:
        negative = make(caption)
        if negative is not None and made < per_image:
          entries = out[rule]
          entries[str(len(entries))] = {"filename": key, "caption": caption,
                                        "negative_caption": negative}
          made += 1
  if num_bad:
    logging.warning("hard negatives: skipped %d records without an image key or caption", num_bad)
  return out


def write(entries: dict[str, dict[str, dict]], out_dir: str) -> list[str]:
  os.makedirs(out_dir, exist_ok=True)
  paths = []
  for rule, rule_entries in entries.items():
    path = os.path.join(out_dir, f"{rule}.json")
    with open(path + ".tmp", "w", encoding="utf-8") as f:
      json.dump(rule_entries, f, indent=1, ensure_ascii=False)
    os.replace(path + ".tmp", path)
    paths.append(path)
  return paths


def main(argv: list[str]) -> None:
  del argv
  f = flags.FLAGS
  split = eval_input.open_eval_split(dict(format=f.format, data=f.data, split=f.split,
                                          data_dir=f.data_dir), captions=True)
  entries = build(split.source, per_image=f.per_image, seed=f.seed)
  for path in write(entries, f.out_dir):
    rule = os.path.basename(path)[:-len(".json")]
    print(f"{path}: {len(entries[rule])} {rule} negatives")


if __name__ == "__main__":
  flags.DEFINE_string("data", None, "The captioned split: a shard glob (relative to the data "
                      "dir), a clip_benchmark folder or a TFDS name (see --format).")
  flags.DEFINE_enum("format", "vlpre", list(eval_input.EVAL_FORMATS), "The split's format.")
  flags.DEFINE_string("split", "test", "clip_benchmark shard folder or TFDS split.")
  flags.DEFINE_string("data_dir", None, "Data dir for relative paths (default: vlpre's).")
  flags.DEFINE_string("out_dir", None, "Where swap.json and replace.json go.")
  flags.DEFINE_integer("per_image", 1, "Entries per image and rule (its first captions that apply).")
  flags.DEFINE_integer("seed", 0, "Seed of the replace rule's choices.")
  flags.mark_flags_as_required(["data", "out_dir"])
  app.run(main)
