"""The embedding store: frozen text-encoder embeddings of a dataset's captions, by key.

Built by `python -m vlpre.embed --config=configs/lift.py:tiny --workdir=workdirs/lift`
(`build_store`; by default under the run's workdir, `cache_dir`), read by
the input pipeline through `LookupEmbedding`. `text_encoder(config)` is the frozen encoder
a config's `text_encoder` section names (loaded once per process).

With `config.text_mode = "cached"` the input pipeline then joins each sample to its
embedding by key, and the train step never runs the LLM (LIFT's O(1) text cost).

The texts are the split's captions, or, for a config with a `describe` section
(GPT4Image), the descriptions that `python -m vlpre.methods.gpt4image.describe` wrote for each image.

Store layout (`config.text_cache`): `meta.json` (the encoder settings it was built
with), and per shard of samples `emb-NNNNN.npy` (float32 [captions, E], memory-mapped)
with `index-NNNNN.json` ({key: [first row, number of captions]}). `meta.json` is
written first, before any shard, with `complete: false`; a rerun checks it (settings,
shard size, sample count) and refuses other settings in one line, so a store never
mixes shards of two encoders. Shards are written to a temporary name and renamed when
complete, so an interrupted run resumes at the first missing shard; `meta.json` is
rewritten with `complete: true` at the end. Multi-host: one process per host with the
same arguments, as vlpre.main (vlpre/distributed.py); the encoder is sharded over every
host's devices and process 0 writes the store, which must be a place all hosts see
(gs://, a shared disk).
"""
from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import re
from typing import Any, Sequence

from absl import logging
import grain
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np
import tqdm

from vlpre import sharding
from vlpre import storage
from vlpre import llm as llm_lib
from vlpre import text_encoders
from vlpre.data import sources
from vlpre.data import text_batching
from vlpre.data import transforms
from vlpre.text_encoders import recipes


@functools.lru_cache(maxsize=4)
def _load_encoder(name: str, max_len: int, dtype: str, pooling: str | None, normalize: bool,
                  template: str | None, layer: int, scan: bool = True, recipe_digest: str = "",
                  abstract: bool = False):
  # Part of the cache key only: a recipe re-saved under its name reloads; abstract weights
  # (llm.abstract_weights, which the loaders read themselves) are not the real ones.
  del recipe_digest, abstract
  return text_encoders.load_text_encoder(name, max_len=max_len, dtype=jnp.dtype(dtype),
                                         pooling=pooling, normalize=normalize,
                                         template=template, layer=layer, scan=scan)


def text_encoder(config):
  """The frozen encoder named by `config.text_encoder` (loaded once per process).

  `text_encoder.scan` (default True) scans the decoder's layers; False unrolls them
  (one parameter subtree per layer; XLA's cost analysis then counts every layer). An
  empty template or pooling takes the encoder's own: a saved recipe's
  (vlpre.text_encoders.recipes), else the text alone and the native pooling.
  """
  t = config.text_encoder
  return _load_encoder(t.name, t.max_len, t.get("dtype", "float32"), t.get("pooling") or None,
                       t.get("normalize", True), t.get("template") or None, t.get("layer", -1),
                       bool(t.get("scan", True)), getattr(recipes.find(t.name), "digest", ""),
                       llm_lib.weights_abstract())


def descriptions_file(config) -> str:
  """Where `config.describe` keeps the per-sample texts the store embeds instead of captions."""
  return os.path.join(config.describe.output_dir, "descriptions.jsonl")


def read_descriptions(path: str) -> dict[str, list[str]]:
  """key → [descriptions] from a JSONL of {"key", "description"} (a key may repeat).

  Raises ValueError naming the line for non-UTF-8 bytes, malformed JSON, a missing
  field or an empty description.
  """
  out: dict[str, list[str]] = {}
  problems = []
  with storage.path(path, what="descriptions").open("rb") as f:
    for number, raw in enumerate(f, start=1):
      if not raw.strip():
        continue
      try:
        row = json.loads(raw.decode("utf-8"))
      except UnicodeDecodeError as e:
        problems.append(f"line {number}: not UTF-8 ({e})")
        continue
      except json.JSONDecodeError as e:
        problems.append(f"line {number}: not JSON ({e})")
        continue
      row = row if isinstance(row, dict) else {}
      key, text = row.get("key"), row.get("description")
      if not isinstance(key, str) or not key:
        problems.append(f"line {number}: no string 'key'")
      elif not isinstance(text, str) or not text.strip():
        problems.append(f"line {number} (key {key!r}): empty or missing 'description'")
      else:
        out.setdefault(key, []).append(text.strip())
  if problems:
    raise ValueError(f"{path}: {len(problems)} bad lines, e.g. " + "; ".join(problems[:5]))
  return out


def encoder_settings(config) -> dict[str, Any]:
  t = config.text_encoder
  settings = {"name": t.name, "max_len": int(t.max_len), "pooling": t.get("pooling") or None,
              "normalize": bool(t.get("normalize", True)), "template": t.get("template", "{text}"),
              "layer": int(t.get("layer", -1)), "caption_field": config.input.caption_field}
  recipe = recipes.find(t.name)
  if recipe is not None:  # a tuned recipe: its settings and weights, not just its name
    settings["recipe"] = recipe.digest
  if config.get("describe"):  # texts from describe's output: the store follows its content
    path = storage.path(descriptions_file(config))
    if not path.exists():
      raise FileNotFoundError(f"no descriptions at {path}: run `python -m vlpre.methods.gpt4image.describe "
                              "--config=...` first")
    settings["descriptions_sha1"] = hashlib.sha1(path.read_bytes()).hexdigest()
  return settings


def cache_dir(config) -> str:
  """`config.text_cache`, or by default `embeddings/<encoder>-L<max_len>-<hash of settings and
  data>` under the run's workdir (`config_lib.with_workdir`): a place every host of the run
  sees, local or gs://, the same for vlpre.embed and the run it feeds. Embedded
  descriptions (`config.describe`) sit beside them instead, in `describe.output_dir`:
  every run over those descriptions shares them."""
  if config.get("text_cache"):
    return config.text_cache
  root = config.describe.output_dir if config.get("describe") else config.get("workdir")
  if not root:
    raise ValueError("text_cache is empty and there is no workdir to keep the embedding "
                     "store in: pass --workdir (the run's) or set --config.text_cache")
  settings = encoder_settings(config)
  digest = hashlib.sha1(json.dumps({**settings, "train": str(config.input.train)},
                                   sort_keys=True).encode()).hexdigest()[:8]
  name = re.sub(r"[^A-Za-z0-9_.-]+", "_", settings["name"]).strip("_")
  return os.path.join(os.fspath(storage.path(root, what="workdir")), "embeddings",
                      f"{name}-L{settings['max_len']}-{digest}")


class EmbeddingStore:
  """Read side: `lookup(key, caption_index) -> float32 [E]`. Picklable for grain workers."""

  def __init__(self, directory: str, expected_settings: dict[str, Any] | None = None):
    self.directory = directory
    meta_path = storage.path(directory, what="text_cache") / "meta.json"
    if not meta_path.exists():
      raise FileNotFoundError(f"no embedding store at {directory}: run "
                              "`python -m vlpre.embed --config=...` first")
    self.meta = json.loads(meta_path.read_text(encoding="utf-8"))
    if expected_settings is not None and self.meta["settings"] != expected_settings:
      raise ValueError(f"embedding store {directory} was built with {self.meta['settings']}, "
                       f"the config asks for {expected_settings}; rebuild it or point "
                       "config.text_cache elsewhere")
    if not self.meta.get("complete"):
      raise ValueError(f"embedding store {directory} is incomplete: rerun vlpre.embed to finish it")
    self.dim = int(self.meta["dim"])
    self._index: dict[str, tuple[int, int, int]] = {}
    for shard in range(self.meta["num_shards"]):
      index = storage.path(directory) / f"index-{shard:05d}.json"
      for key, (row, count) in json.loads(index.read_text(encoding="utf-8")).items():
        self._index[key] = (shard, row, count)
    self._arrays: dict[int, np.ndarray] = {}

  def __len__(self) -> int:
    return len(self._index)

  def mean(self) -> np.ndarray:
    """float32 [E]: the mean of every stored embedding (written by build_store), for
    mean-centring a fixed text embedding (`config.text_encoder.center`)."""
    path = storage.path(self.directory) / "mean.npy"
    if not path.exists():
      raise FileNotFoundError(f"{path} is missing: rebuild the store with this vlpre version")
    return _load_npy(path).astype(np.float32)

  def __getstate__(self):
    return {**self.__dict__, "_arrays": {}}

  def lookup(self, key: str, caption_index: int = 0) -> np.ndarray:
    try:
      shard, row, count = self._index[key]
    except KeyError:
      raise KeyError(f"sample '{key}' is not in the embedding store {self.directory}: it was "
                     "built for other data; rerun vlpre.embed for this dataset") from None
    if not 0 <= caption_index < count:
      raise IndexError(f"sample '{key}' has {count} cached captions, asked for #{caption_index}")
    if shard not in self._arrays:
      self._arrays[shard] = _load_npy(storage.path(self.directory) / f"emb-{shard:05d}.npy")
    return np.asarray(self._arrays[shard][row + caption_index], np.float32)


def _load_npy(path) -> np.ndarray:
  """A local .npy memory-mapped; one in a bucket read whole (objects cannot be mapped)."""
  if storage.is_uri(path):
    return np.load(io.BytesIO(path.read_bytes()))
  return np.load(path, mmap_mode="r")


def _npy_bytes(array: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  np.save(buffer, array)
  return buffer.getvalue()


class LookupEmbedding(grain.transforms.Map):
  """Adds `txt_emb` [E] for the record's key and drawn caption (`caption_index`)."""

  def __init__(self, store: EmbeddingStore):
    self.store = store

  def map(self, record):
    if transforms.is_bad(record):
      return record
    record["txt_emb"] = self.store.lookup(record["__key__"], int(record.get("caption_index", 0)))
    return record


def _captions(record, field: str) -> list[str]:
  parsed = transforms.ParseCaption(field=field, pick="all").map(dict(record))
  return [] if transforms.is_bad(parsed) else list(parsed["captions"])


def sharded_encoder(config, encoder, mesh):
  """(params, jitted embed(params, ids, mask), rules): the encoder sharded as the trainer
  shards it (logical names → mesh axes by the config's rules), so an encoder too big for
  one device (the 7B preset of configs/lift.py) embeds on the mesh that trains with it."""
  rules = sharding.logical_rules(config.get("sharding_rules"))
  param_shardings = sharding.logical_names_to_shardings(encoder.logical_axes(), mesh, rules)
  params = jax.device_put(encoder.params, param_shardings)
  row_sharding = sharding.batch_sharding(mesh)
  with sharding.active(mesh, rules):
    embed = jax.jit(lambda p, ids, mask: encoder.module.apply({"params": p}, ids, mask),
                    in_shardings=(param_shardings, row_sharding, row_sharding),
                    out_shardings=sharding.replicated(mesh))
  return params, embed, rules


def build_store(config, *, split_patterns: Sequence[str] | str | None = None,
                directory: str | None = None, shard_size: int = 1000, batch_size: int = 256,
                progress: bool = True) -> EmbeddingStore:
  """Embeds every caption (or description) of the split with the frozen encoder (resumable).

  Each distinct text is encoded once per shard (class-level descriptions repeat a lot);
  rows are still stored per sample, so the layout does not depend on the texts.
  """
  directory = directory or cache_dir(config)
  root = storage.path(directory, what="text_cache")
  root.mkdir(parents=True, exist_ok=True)
  settings = encoder_settings(config)
  meta_path = root / "meta.json"
  source = sources.TarShardSource(split_patterns or config.input.train, config.input.data_dir)
  started = {"settings": settings, "shard_size": shard_size, "num_samples": len(source)}
  _check_resume(root, directory, started)
  if jax.process_index() == 0 and not meta_path.exists():  # before any shard (module docstring)
    storage.write_atomic(meta_path, json.dumps({**started, "complete": False}, indent=1))
  descriptions = None
  if config.get("describe"):
    descriptions = read_descriptions(descriptions_file(config))
  encoder = text_encoder(config)
  mesh = sharding.make_mesh(config.mesh)
  dp = mesh.shape["data"] * mesh.shape["fsdp"]
  batch_size = -(-batch_size // dp) * dp
  row_sharding = sharding.batch_sharding(mesh)
  params, embed, rules = sharded_encoder(config, encoder, mesh)
  num_shards = -(-len(source) // shard_size)
  # Multi-process (module docstring): process 0 decides the missing shards and writes.
  writer = jax.process_index() == 0
  done = np.array([(root / f"emb-{i:05d}.npy").exists() and (root / f"index-{i:05d}.json").exists()
                   for i in range(num_shards)] if writer else [False] * num_shards, bool)
  if jax.process_count() > 1 and num_shards:
    done = np.asarray(multihost_utils.broadcast_one_to_all(done), bool)
  bar = tqdm.tqdm(total=len(source), disable=not progress or not writer,
                  desc="embedding " + ("descriptions" if descriptions is not None else "captions"))
  for shard in range(num_shards):
    emb_path = root / f"emb-{shard:05d}.npy"
    index_path = root / f"index-{shard:05d}.json"
    lo, hi = shard * shard_size, min((shard + 1) * shard_size, len(source))
    if done[shard]:
      bar.update(hi - lo)
      continue
    texts, index = [], {}
    for i in range(lo, hi):
      record = source[i]
      if descriptions is None:
        caps = _captions(record, config.input.caption_field)
      else:
        caps = descriptions.get(record["__key__"])
        if not caps:
          raise KeyError(f"sample {record['__key__']!r} has no description in "
                         f"{descriptions_file(config)}: rerun vlpre.methods.gpt4image.describe for this split")
      index[record["__key__"]] = [len(texts), len(caps)]
      texts.extend(caps)
    unique = list(dict.fromkeys(texts))
    emb = np.zeros((len(unique), encoder.dim), np.float32)
    if unique:
      ids_NxL, mask_NxL = encoder.tokenizer.encode_batch(unique, settings["max_len"])
      for rows, ids, mask in text_batching.bucketed_batches(ids_NxL, mask_NxL, batch_size):
        with sharding.active(mesh, rules):
          out = embed(params, jax.device_put(ids, row_sharding), jax.device_put(mask, row_sharding))
        emb[rows] = np.asarray(out, np.float32)[:len(rows)]
    row_of = {text: i for i, text in enumerate(unique)}
    emb = emb[np.array([row_of[t] for t in texts], np.int64)].reshape(len(texts), encoder.dim)
    if writer:
      storage.write_atomic(emb_path, _npy_bytes(emb))
      storage.write_atomic(index_path, json.dumps(index))
    bar.update(hi - lo)
  bar.close()
  if writer:  # the mean and meta.json; the other processes wait for them
    total, count = np.zeros(encoder.dim, np.float64), 0
    for shard in range(num_shards):
      rows = _load_npy(root / f"emb-{shard:05d}.npy")
      total += np.asarray(rows, np.float64).sum(axis=0)
      count += len(rows)
    storage.write_atomic(root / "mean.npy", _npy_bytes((total / max(count, 1)).astype(np.float32)))
    storage.write_atomic(meta_path, json.dumps(
        {**started, "dim": encoder.dim, "num_shards": num_shards, "complete": True}, indent=1))
    logging.info("embedding store complete: %s (%d samples)", directory, len(source))
  _sync_processes("vlpre.embed: store complete")
  return EmbeddingStore(directory, settings)


def _check_resume(root, directory: str, started: dict[str, Any]) -> None:
  """Refuses, in one line, to add shards to a store begun with other settings, shard size
  or data (`started`: what this run would write into meta.json), or to one whose shards
  have no meta.json to say what built them."""
  meta_path = root / "meta.json"
  if not meta_path.exists():
    if any(root.glob("emb-*.npy")) or any(root.glob("index-*.json")):
      raise ValueError(f"{directory} holds embedding shards but no meta.json: the settings "
                       "that built them are unknown; delete them or use another text_cache")
    return
  old = json.loads(meta_path.read_text(encoding="utf-8"))
  before, now = old.get("settings") or {}, started["settings"]
  changed = [f"{name}: {before.get(name)!r} -> {now.get(name)!r}"
             for name in dict.fromkeys([*before, *now]) if before.get(name) != now.get(name)]
  changed += [f"{name}: {old[name]!r} -> {started[name]!r}"
              for name in ("shard_size", "num_samples")
              if old.get(name, started[name]) != started[name]]  # absent: an older store
  if changed:
    raise ValueError(f"{directory} holds embeddings begun with other settings "
                     f"({'; '.join(changed)}): finish it with the settings it was begun "
                     "with, or use another text_cache")


def _sync_processes(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)
