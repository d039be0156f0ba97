"""Builds the datasets the notebooks read, where ../shared/data is not at hand (Colab).

    python notebooks/get_data.py --out=/content/data      # then VLPRE_DATA_DIR=/content/data

Writes the layout of the shared data (../shared/data/README.md) with vlpre's converter
(`vlpre.data.convert`), from the same public sources:
  cifar10/   train + test, from TensorFlow Datasets' `cifar10` (the standard split; all
             50,000 training images, where the shared copy keeps a 10,000-image subset)
  flickr8k/  train (6,000) + val (1,000) at 160 px, images from
             github.com/RlNZLER/Image-Text-Matching @ 5651b89b (data/images/, with the
             official split lists data/flickr8k.{Train,Dev}Images.txt), captions from
             github.com/quantumnaan/sic_translator @ d27da85c (data/ignore_captions.txt,
             five per image, "<file>#<n><TAB><caption>" or "<file>,<caption>" lines)
imagenet_sample/ is not built (the notebooks do not evaluate on it). Needs network
access and ~2 GB of disk; this script is not run by the test suite (CI reads
../shared/data), so it is the one untested path of the notebooks.
"""
from __future__ import annotations

import argparse
import csv
import os
import subprocess
import tempfile

IMAGES_REPO = ("https://github.com/RlNZLER/Image-Text-Matching.git",
               "5651b89b22dc733e6a8215b93acb5dd420ad5b41")
CAPTIONS_REPO = ("https://github.com/quantumnaan/sic_translator.git",
                 "d27da85cff2dbf143fcaf365aece667d66c4298f")


def fetch(repo: tuple[str, str], into: str) -> str:
  """One commit of a git repository, shallow."""
  url, commit = repo
  os.makedirs(into, exist_ok=True)
  for args in (["init", "-q"], ["remote", "add", "origin", url],
               ["fetch", "-q", "--depth", "1", "origin", commit], ["checkout", "-q", "FETCH_HEAD"]):
    subprocess.run(["git", "-C", into, *args], check=True)
  return into


def read_caption_lines(path: str) -> dict[str, list[str]]:
  captions: dict[str, list[str]] = {}
  with open(path, encoding="utf-8") as f:
    for line in f:
      line = line.strip()
      if not line or line.lower().startswith("image,caption"):
        continue
      if "\t" in line:
        name, text = line.split("\t", 1)
      else:
        name, text = line.split(",", 1)
      captions.setdefault(name.split("#")[0].strip(), []).append(text.strip())
  return captions


def build_flickr8k(out: str, work: str) -> None:
  from vlpre.data import convert  # pylint: disable=g-import-not-at-top
  images = fetch(IMAGES_REPO, os.path.join(work, "images_repo"))
  texts = fetch(CAPTIONS_REPO, os.path.join(work, "captions_repo"))
  captions = read_caption_lines(os.path.join(texts, "data", "ignore_captions.txt"))
  for split, listing in (("train", "flickr8k.TrainImages.txt"), ("val", "flickr8k.DevImages.txt")):
    with open(os.path.join(images, "data", listing), encoding="utf-8") as f:
      names = [n.strip() for n in f if n.strip()]
    csv_path = os.path.join(work, f"{split}.csv")
    with open(csv_path, "w", encoding="utf-8", newline="") as f:
      writer = csv.writer(f)
      writer.writerow(["filename", "caption"])
      for name in names:
        for caption in captions.get(name, [])[:5]:
          writer.writerow([name, caption])
    stats = convert.convert_captions(os.path.join(images, "data", "images"), csv_path,
                                     os.path.join(out, "flickr8k"), split=split, resize=160,
                                     image_format="jpg")
    print(f"flickr8k/{split}: {stats.num_written} samples ({stats.num_bad} skipped)")


def build_cifar10(out: str, work: str) -> None:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from vlpre.data import convert  # pylint: disable=g-import-not-at-top
  tfds_dir = os.path.join(work, "tfds")
  tfds.builder("cifar10", data_dir=tfds_dir, file_format="array_record").download_and_prepare()
  for split in ("train", "test"):
    stats = convert.convert_tfds("cifar10", split, os.path.join(out, "cifar10"), split=split,
                                 data_dir=tfds_dir, samples_per_shard=5000)
    print(f"cifar10/{split}: {stats.num_written} samples")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  parser.add_argument("--out", required=True, help="the data directory to write")
  parser.add_argument("--work", default=None, help="scratch space (default: a temp dir)")
  args = parser.parse_args()
  work = args.work or tempfile.mkdtemp(prefix="vlpre_data_")
  if not os.path.isdir(os.path.join(args.out, "cifar10")):
    build_cifar10(args.out, work)
  if not os.path.isdir(os.path.join(args.out, "flickr8k")):
    build_flickr8k(args.out, work)
  print(f"done: export VLPRE_DATA_DIR={os.path.abspath(args.out)}")


if __name__ == "__main__":
  main()
