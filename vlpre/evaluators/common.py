"""What every evaluator shares: sharded, jitted embedding of images and texts."""
from __future__ import annotations

import functools
import os
from typing import Any, Iterable, Sequence

import grain
import jax
import numpy as np

from vlpre import data
from vlpre import losses
from vlpre import sharding
from vlpre.data import text_batching


def eval_batches(cfg: Any, split: Any, *, max_examples: int = 0, **kwargs):
  """`data.iterate_eval` over `split` (a glob of vlpre's shards, or any random-access
  source, e.g. `data.open_eval_split(cfg).source`), its first `max_examples` samples if > 0.
  Labels outside [0, cfg's num_classes), when it has one, are bad samples."""
  source: Any = split
  if isinstance(split, (str, os.PathLike, list, tuple)):
    source = data.TarShardSource(split, data_dir=cfg.get("data_dir"))
  if max_examples:
    source = grain.MapDataset.source(source)[:max_examples]
  if kwargs.get("with_labels") and cfg.get("num_classes"):
    kwargs.setdefault("num_classes", int(cfg["num_classes"]))
  return data.iterate_eval(source, image_size=cfg["image_size"],
                           resize_size=cfg.get("resize_size", cfg["image_size"]),
                           batch_size=cfg.get("batch_size", 256), **kwargs)


class Predictor:
  """Embeds host batches with the current variables; the batch is split over the data axes.

  Built once per run, so each embedding function compiles once per input shape. Where the
  model's text embedding reads frozen parameters only (a frozen text encoder: LIFT's), a
  list of texts is embedded once per run and served from memory afterwards, so periodic
  evaluations do not run the frozen encoder over the same captions and prompts again.
  """

  def __init__(self, setup: Any, tokenizer: Any):
    self.setup, self.tokenizer = setup, tokenizer
    model = setup.model
    self.data_parallel = setup.mesh.shape["data"] * setup.mesh.shape["fsdp"]
    out = jax.sharding.NamedSharding(setup.mesh, jax.sharding.PartitionSpec())
    self._embed_text = jax.jit(
        lambda v, text, mask: model.apply(v, text, mask, method=model.embed_text),
        out_shardings=out)
    self._image_methods: dict[str, Any] = {}
    self._text_cache: dict[tuple, tuple[np.ndarray, tuple]] = {}

  def _put(self, x):
    return jax.device_put(np.asarray(x), self.setup.batch_sharding)

  def _check_batch(self, n: int):
    if n % self.data_parallel:
      raise ValueError(f"eval batch size {n} is not divisible by the {self.data_parallel} "
                       "data-parallel devices")

  def image_embeddings(self, variables, batches: Iterable[dict]) -> dict[str, np.ndarray]:
    """Concatenated {"zimg", "pre_logits", "label"?} over `batches`, padding rows dropped."""
    return self.image_outputs(variables, batches, "embed_image")

  def image_outputs(self, variables, batches: Iterable[dict], method: str) -> dict[str, np.ndarray]:
    """Like `image_embeddings` for any image method of the model (e.g. "classify").

    A method returning one array is reported under its own name; each method compiles
    once per input shape.
    """
    if method not in self._image_methods:
      model = self.setup.model
      self._image_methods[method] = jax.jit(
          lambda v, image: model.apply(v, image, method=method),
          out_shardings=jax.sharding.NamedSharding(self.setup.mesh, jax.sharding.PartitionSpec()))
    apply = self._image_methods[method]
    parts: dict[str, list] = {}
    with sharding.active(self.setup.mesh, self.setup.rules):
      for batch in batches:
        self._check_batch(len(batch["image"]))
        out = jax.device_get(apply(variables, self._put(batch["image"])))
        out = out if isinstance(out, dict) else {method: out}
        keep = np.asarray(batch["mask"], bool)
        for k, v in out.items():
          parts.setdefault(k, []).append(np.asarray(v)[keep])
        if "label" in batch:
          parts.setdefault("label", []).append(np.asarray(batch["label"])[keep])
    return {k: np.concatenate(v) for k, v in parts.items()}

  @functools.cached_property
  def fixed_text_inputs(self) -> tuple[str, ...] | None:
    """The parameter paths the model's text embedding reads, when all of them are frozen
    and it reads no mutable state: its output is then fixed for the run. None otherwise.

    Read off the jaxpr of `embed_text` traced over the run's variables: a variable the
    embedding does not read appears in none of its equations.
    """
    setup, model = self.setup, self.setup.model
    variables = setup.variables()
    ids = jax.ShapeDtypeStruct((self.data_parallel, 8), np.int32)
    with sharding.active(setup.mesh, setup.rules):
      jaxpr = jax.make_jaxpr(
          lambda v, text, mask: model.apply(v, text, mask, method=model.embed_text))(
              variables, ids, ids).jaxpr
    used = {id(v) for eqn in jaxpr.eqns for v in eqn.invars} | {id(v) for v in jaxpr.outvars}
    read = [p for p, v in zip(sharding.tree_paths(variables), jaxpr.invars) if id(v) in used]
    trainable = {"params/" + p for p in sharding.tree_paths(setup.state.params)}
    fixed = all(p.startswith("params/") and p not in trainable for p in read)
    return tuple(read) if fixed else None

  def text_embeddings(self, variables, texts: Sequence[str], max_len: int,
                      batch_size: int = 256) -> np.ndarray:
    """[len(texts), E] text embeddings, in order (computed in length buckets).

    Embedded once per Predictor where the embedding reads frozen weights only
    (`fixed_text_inputs`); a later call with the same texts and the same weight arrays
    returns a copy of the first result.
    """
    if self.tokenizer is None:
      raise ValueError("this model has no tokenizer: it cannot embed text")
    self._check_batch(batch_size)
    key, weights = None, ()
    if (inputs := self.fixed_text_inputs) is not None:
      leaves = dict(zip(sharding.tree_paths(variables), jax.tree.leaves(variables)))
      if all(p in leaves for p in inputs):
        weights = tuple(leaves[p] for p in inputs)  # held by the entry: no id is reused
        key = (tuple(texts), max_len, batch_size, tuple(id(w) for w in weights))
        if key in self._text_cache:
          return self._text_cache[key][0].copy()
    out_NxE = self._embed_texts(variables, texts, max_len, batch_size)
    if key is not None:
      self._text_cache[key] = (out_NxE.copy(), weights)
    return out_NxE

  def _embed_texts(self, variables, texts: Sequence[str], max_len: int,
                   batch_size: int) -> np.ndarray:
    ids_NxL, mask_NxL = self.tokenizer.encode_batch(list(texts), max_len)
    out_NxE = None
    with sharding.active(self.setup.mesh, self.setup.rules):
      for rows, ids, mask in text_batching.bucketed_batches(ids_NxL, mask_NxL, batch_size):
        out = np.asarray(jax.device_get(self._embed_text(variables, self._put(ids), self._put(mask))))
        if out_NxE is None:
          out_NxE = np.zeros((len(texts), out.shape[-1]), np.float32)
        out_NxE[rows] = out[:len(rows)]
    return out_NxE


def normalize(x: np.ndarray) -> np.ndarray:
  return np.asarray(losses.l2_normalize(x))


def topk_hits(scores_QxC: np.ndarray, targets: Sequence[set[int]] | np.ndarray, k: int) -> np.ndarray:
  """Per query, whether any of its target columns ranks in the top k."""
  top_QxK = np.argsort(-scores_QxC, axis=1, kind="stable")[:, :k]
  if isinstance(targets, np.ndarray):
    return (top_QxK == targets[:, None]).any(axis=1)
  return np.array([bool(set(row.tolist()) & t) for row, t in zip(top_QxK, targets)])


def mean_per_class_recall(pred_N: np.ndarray, labels_N: np.ndarray) -> float:
  """The recall of each class present in `labels_N`, averaged (clip_benchmark's
  mean_per_class_recall, sklearn's balanced_accuracy_score)."""
  labels_N, pred_N = np.asarray(labels_N, np.int64), np.asarray(pred_N, np.int64)
  count_C = np.bincount(labels_N)
  hits_C = np.bincount(labels_N[pred_N == labels_N], minlength=len(count_C))
  present = count_C > 0
  return float(np.mean(hits_C[present] / count_C[present]))
