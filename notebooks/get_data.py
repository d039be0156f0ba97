"""Builds the datasets the `:tiny` configs train and evaluate on, where ../shared/data is
not at hand (a fresh clone, Colab). `make data` runs it:

    python notebooks/get_data.py --out=workdirs/data     # then VLPRE_DATA_DIR=workdirs/data

Writes the layout of the shared data (shards, classnames.json) with vlpre's converter
(`vlpre.data.convert`), from the same public sources, each pinned to a commit (git checks
every object it fetches against that hash) or, for CIFAR-10, fetched by TensorFlow
Datasets (which checks its download's registered checksum):
  cifar10/          train + test, TFDS `cifar10` (the standard split: all 50,000 training
                    images, where the shared copy keeps a 10,000-image subset)
  flickr8k/         train (6,000) + val (1,000) at 160 px, images from
                    github.com/RlNZLER/Image-Text-Matching (data/images/, with the official
                    split lists data/flickr8k.{Train,Dev}Images.txt), captions from
                    github.com/quantumnaan/sic_translator (data/ignore_captions.txt, five per
                    image, "<file>#<n><TAB><caption>" or "<file>,<caption>" lines)
  imagenet_sample/  one photo per ImageNet-1k class, github.com/EliSchwartz/
                    imagenet-sample-images (`<wnid>_<name>.JPEG`): shorter side 160, center
                    crop, `.cls` = the wnid's index in sorted order, wnids.json and
                    classnames.json (the name with underscores as spaces)
Fashion-MNIST (bridge training's second target) comes from Debian's package instead
(`make fashion-mnist`).

Resumable: each set is built in `<out>/<set>.partial` and moved into place whole, with a
SHA256SUMS of its files. A set already there is kept when those checksums match (or when
it has none: data from elsewhere, such as a copy of ../shared/data); one that fails them is
built again. An interrupted run leaves only a `.partial` folder, which the next removes.

`--sources=FILE` (JSON, `{"imagenet_sample": ["URL", "COMMIT"], ...}`) points a set at
another copy of its repository, e.g. a mirror; tests/test_get_data.py builds from local
repositories (file:// URLs) that way, as these machines have no network.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile

# name: (git URL, commit)
SOURCES = {
    "flickr8k_images": ("https://github.com/RlNZLER/Image-Text-Matching.git",
                        "5651b89b22dc733e6a8215b93acb5dd420ad5b41"),
    "flickr8k_captions": ("https://github.com/quantumnaan/sic_translator.git",
                          "d27da85cff2dbf143fcaf365aece667d66c4298f"),
    "imagenet_sample": ("https://github.com/EliSchwartz/imagenet-sample-images.git",
                        "bc69043e2862758a1906c6a24a792bb28c6bb2ff"),
}
SETS = ("cifar10", "flickr8k", "imagenet_sample")
CHECKSUMS = "SHA256SUMS"
IMAGENET_SIZE = 160


def fetch(repo: tuple[str, str], into: str) -> str:
  """One commit of a git repository, shallow."""
  url, commit = repo
  if os.path.isdir(into):
    shutil.rmtree(into)
  os.makedirs(into)
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


def build_flickr8k(out: str, work: str, sources: dict) -> None:
  from vlpre.data import convert  # pylint: disable=g-import-not-at-top
  images = fetch(sources["flickr8k_images"], os.path.join(work, "images_repo"))
  texts = fetch(sources["flickr8k_captions"], os.path.join(work, "captions_repo"))
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
    stats = convert.convert_captions(os.path.join(images, "data", "images"), csv_path, out,
                                     split=split, resize=160, image_format="jpg")
    print(f"flickr8k/{split}: {stats.num_written} samples ({stats.num_bad} skipped)")


def _center_crop_jpeg(path: str, size: int) -> bytes:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  with Image.open(path) as img:
    rgb = img.convert("RGB")
  w, h = rgb.size
  scale = size / min(w, h)
  rgb = rgb.resize((max(size, round(w * scale)), max(size, round(h * scale))),
                   Image.Resampling.LANCZOS)
  left, top = (rgb.width - size) // 2, (rgb.height - size) // 2
  buffer = io.BytesIO()
  rgb.crop((left, top, left + size, top + size)).save(buffer, format="JPEG", quality=90)
  return buffer.getvalue()


def build_imagenet_sample(out: str, work: str, sources: dict) -> None:
  from vlpre.data import shard_writer  # pylint: disable=g-import-not-at-top
  repo = fetch(sources["imagenet_sample"], os.path.join(work, "imagenet_repo"))
  files = sorted(f for f in os.listdir(repo) if f.endswith(".JPEG"))
  by_wnid: dict[str, str] = {}
  for name in files:
    wnid = name.split("_", 1)[0]
    if wnid in by_wnid:
      raise ValueError(f"imagenet_sample: two photos of {wnid} ({by_wnid[wnid]}, {name})")
    by_wnid[wnid] = name
  wnids = sorted(by_wnid)

  def loader(name: str, label: int):
    return lambda: (_center_crop_jpeg(os.path.join(repo, name), IMAGENET_SIZE),
                    {"cls": str(label).encode("ascii")})

  samples = [(shard_writer.make_key(by_wnid[w]), loader(by_wnid[w], i)) for i, w in enumerate(wnids)]
  stats = shard_writer.write_samples(samples, out, "imagenet_sample", samples_per_shard=1000,
                                resize=None, image_format="jpg")
  names = [os.path.splitext(by_wnid[w])[0].split("_", 1)[1].replace("_", " ") for w in wnids]
  for filename, value in (("wnids.json", wnids), ("classnames.json", names)):
    with open(os.path.join(out, filename), "w", encoding="utf-8") as f:
      json.dump(value, f, indent=0, ensure_ascii=False)
      f.write("\n")
  print(f"imagenet_sample: {stats.num_written} samples of {len(wnids)} classes "
        f"({stats.num_bad} skipped)")


def build_cifar10(out: str, work: str, sources: dict) -> None:
  del sources  # TFDS knows where CIFAR-10 lives and checks what it downloads
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from vlpre.data import convert  # pylint: disable=g-import-not-at-top
  tfds_dir = os.path.join(work, "tfds")
  tfds.builder("cifar10", data_dir=tfds_dir, file_format="array_record").download_and_prepare()
  for split in ("train", "test"):
    stats = convert.convert_tfds("cifar10", split, out, split=split, data_dir=tfds_dir,
                                 samples_per_shard=5000)
    print(f"cifar10/{split}: {stats.num_written} samples")


BUILDERS = {"cifar10": build_cifar10, "flickr8k": build_flickr8k,
            "imagenet_sample": build_imagenet_sample}


def _sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def write_checksums(folder: str) -> None:
  names = sorted(n for n in os.listdir(folder) if n != CHECKSUMS)
  with open(os.path.join(folder, CHECKSUMS), "w", encoding="utf-8") as f:
    f.writelines(f"{_sha256(os.path.join(folder, n))}  {n}\n" for n in names)


def checksum_problems(folder: str) -> list[str]:
  """What disagrees with the folder's SHA256SUMS (files changed, missing or added)."""
  with open(os.path.join(folder, CHECKSUMS), encoding="utf-8") as f:
    pairs = [line.rstrip("\n").split("  ", 1) for line in f if line.strip()]
  listed = {name: digest for digest, name in pairs}
  present = {n for n in os.listdir(folder) if n != CHECKSUMS}
  problems = [f"{n}: missing" for n in sorted(set(listed) - present)]
  problems += [f"{n}: not in {CHECKSUMS}" for n in sorted(present - set(listed))]
  problems += [f"{n}: checksum differs" for n in sorted(present & set(listed))
               if _sha256(os.path.join(folder, n)) != listed[n]]
  return problems


def ensure(name: str, out: str, work: str, sources: dict) -> str:
  """Builds set `name` under `out` unless a good copy is there; says which it did."""
  final, partial = os.path.join(out, name), os.path.join(out, name + ".partial")
  if os.path.isdir(partial):  # what an interrupted build left
    shutil.rmtree(partial)
  if os.path.isdir(final):
    if not os.path.exists(os.path.join(final, CHECKSUMS)):
      return f"{name}: kept (no {CHECKSUMS}: data from elsewhere)"
    problems = checksum_problems(final)
    if not problems:
      return f"{name}: kept (checksums match)"
    print(f"{name}: rebuilding, {len(problems)} files disagree with {CHECKSUMS} "
          f"(first: {problems[0]})", file=sys.stderr)
    shutil.rmtree(final)
  os.makedirs(partial)
  BUILDERS[name](partial, os.path.join(work, name), sources)
  write_checksums(partial)
  os.rename(partial, final)
  return f"{name}: built"


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  parser.add_argument("--out", required=True, help="the data directory to write")
  parser.add_argument("--work", default=None, help="scratch space (default: a temp dir)")
  parser.add_argument("--sets", default=",".join(SETS), help=f"comma-separated, of {SETS}")
  parser.add_argument("--sources", default=None,
                      help="JSON file of {source: [git URL, commit]} replacing SOURCES' entries")
  args = parser.parse_args(argv)
  sets = [s for s in args.sets.split(",") if s]
  unknown = sorted(set(sets) - set(SETS))
  if unknown:
    parser.error(f"unknown sets {unknown}; choose from {list(SETS)}")
  sources = dict(SOURCES)
  if args.sources:
    with open(args.sources, encoding="utf-8") as f:
      sources.update({k: tuple(v) for k, v in json.load(f).items()})
  os.makedirs(args.out, exist_ok=True)
  work = args.work or tempfile.mkdtemp(prefix="vlpre_data_")
  try:
    for name in sets:
      print(ensure(name, args.out, work, sources), flush=True)
  except subprocess.CalledProcessError as e:
    sys.exit(f"get_data: {' '.join(e.cmd)} failed (exit {e.returncode}): is the network (or "
             f"the --sources mirror) reachable?")
  finally:
    if not args.work:
      shutil.rmtree(work, ignore_errors=True)
  print(f"done: export VLPRE_DATA_DIR={os.path.abspath(args.out)}")


if __name__ == "__main__":
  main()
