"""What the notebooks in this folder share: paths, tiny overrides, a trained run back in
memory, and the pictures (curves, retrieval grids, confusion matrices, captions).

Everything here calls vlpre's own APIs (`vlpre.train_state.setup`, the evaluators' `Predictor`,
`vlpre.compare.read_run`); the notebooks stay short and the plotting code lives once.
"""
from __future__ import annotations

import dataclasses
import io
import os
import pathlib
import tarfile
from typing import Any, Sequence

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- set-up


def data_dir() -> pathlib.Path | None:
  """$VLPRE_DATA_DIR if set, else ../shared/data beside the checkout (CI), else None."""
  if os.environ.get("VLPRE_DATA_DIR"):
    return pathlib.Path(os.environ["VLPRE_DATA_DIR"])
  beside = REPO.parent / "shared" / "data"
  return beside if (beside / "flickr8k").is_dir() else None


def use_data(path: os.PathLike | str) -> str:
  """Points every vlpre reader at `path` (the environment variable wins over configs)."""
  path = str(pathlib.Path(path).resolve())
  for name in ("flickr8k", "cifar10"):
    if not os.path.isdir(os.path.join(path, name)):
      raise FileNotFoundError(f"{path} has no {name}/ folder: see notebooks/get_data.py")
  os.environ["VLPRE_DATA_DIR"] = path
  return path


def subset_shard(pattern: str, count: int, out_path: str) -> str:
  """The first `count` samples of a tar split, copied into one shard at `out_path`.

  A training glob may be an absolute path, so a config trains on this subset with
  `config.input.train = subset_shard(...)`. Members are copied byte for byte.
  """
  from vlpre.data import sources  # pylint: disable=g-import-not-at-top
  shards = sources.TarShardSource(pattern).shards
  os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
  keys: list[str] = []
  with tarfile.open(out_path + ".tmp", "w", format=tarfile.USTAR_FORMAT) as out:
    for shard in shards:
      with tarfile.open(shard) as tar:
        for member in tar:
          key = member.name.split(".", 1)[0]
          if key not in keys:
            if len(keys) == count:
              break
            keys.append(key)
          out.addfile(member, tar.extractfile(member))
      if len(keys) == count:
        break
  os.replace(out_path + ".tmp", out_path)
  return os.path.abspath(out_path)


def shorten(config, steps: int, batch: int, *, train: str = "", examples: int = 0,
            workdir: str = ".") -> None:
  """A notebook's cut of a config: `steps` steps of `batch`, warm-up within the first
  fifth, one checkpoint at the end, ~100 logged steps; with `examples`, trained on the
  first `examples` samples of the split `train` (a glob), copied under `workdir`/data."""
  config.total_steps, config.batch_size = steps, batch
  config.optim.warmup_steps = max(1, min(config.optim.warmup_steps, steps // 5))
  config.checkpoint.every_steps = steps
  config.log_every = max(1, steps // 100)
  if examples:
    config.input.train = subset_shard(train, examples, f"{workdir}/data/train-{examples}.tar")


def shrink_evals(config, examples: int, every_steps: int = 0, batch_size: int = 64) -> None:
  """Every evaluator on at most `examples` test images (probes: 2× that to train on),
  in batches of `batch_size`, run every `every_steps` steps (0: at the end only)."""
  for cfg in config.evals.values():
    cfg.batch_size = batch_size
    if "every_steps" in cfg or every_steps:
      cfg.every_steps = every_steps
    cfg.max_examples = examples
    if cfg.kind in ("linear_probe", "attentive_probe"):
      cfg.max_train_examples = 2 * examples


# ------------------------------------------------------------------ a run in memory


@dataclasses.dataclass
class Loaded:
  """A trained run back in memory: its setup, variables and an embedding predictor."""
  config: Any
  setup: Any
  variables: Any
  predictor: Any

  @property
  def tokenizer(self):
    return self.predictor.tokenizer


def load_run(config, workdir: str) -> Loaded:
  """The final parameters of a run: a staged run's last export, else the latest checkpoint
  (its trainable parameters over the method's initial / pretrained ones)."""
  # pylint: disable=g-import-not-at-top
  import jax
  from vlpre import checkpoint, data, init_params, methods, optim, stages, train_state
  from vlpre.evaluators import common
  # pylint: enable=g-import-not-at-top
  if config.get("stages"):
    last = len(config.stages) - 1
    export = os.path.join(stages.stage_dir(workdir, last, config.stages[last]), "final_params")
    config = stages.stage_config(config, last, workdir)
  tokenizer = methods.build_tokenizer(config)
  extras = methods.input_extras(config)
  example = next(iter(data.build_train_dataset(
      config.input, global_batch_size=config.batch_size, seed=0,
      tokenizer=tokenizer if extras.tokenize else None, extra_transforms=extras.transforms,
      extra_keys=extras.keys, stream=extras.stream, records=extras.records)))
  s = train_state.setup(config, example)
  variables = jax.device_get(s.variables(s.state))
  if config.get("init_from") and config.init_from.get("params"):  # a staged run
    params = init_params.load_params(export)
  else:
    params = optim.merge(variables["params"],
                         checkpoint.restore_params(workdir, tuple(s.state.params)))
  variables = {**variables, "params": params}
  return Loaded(config, s, variables, common.Predictor(s, tokenizer))


def eval_images(pattern: str, count: int, *, image_size: int, batch_size: int = 64,
                captions: bool = False, labels: bool = False) -> dict[str, Any]:
  """The first `count` images of a split as the evaluators see them (normalised), with
  their captions / labels, and a displayable uint8 copy ("pixels")."""
  from vlpre import data  # pylint: disable=g-import-not-at-top
  parts: dict[str, list] = {}
  for batch in data.iterate_eval(pattern, image_size=image_size, resize_size=image_size,
                                 batch_size=batch_size, with_captions=captions,
                                 with_labels=labels, max_examples=count):
    keep = np.asarray(batch["mask"], bool)
    parts.setdefault("image", []).append(np.asarray(batch["image"])[keep])
    if labels:
      parts.setdefault("label", []).append(np.asarray(batch["label"])[keep])
    if captions:
      parts.setdefault("captions", []).append(np.array(batch["captions"], dtype=object))
  out = {k: np.concatenate(v) for k, v in parts.items()}
  mean, std = np.array(data.CLIP_MEAN), np.array(data.CLIP_STD)
  out["pixels"] = np.clip((out["image"] * std + mean) * 255, 0, 255).astype(np.uint8)
  return out


def embed_texts(run: Loaded, texts: Sequence[str], max_len: int = 77) -> np.ndarray:
  """The model's text embeddings (its `embed_text`), in one small padded batch per 256."""
  batch_size = min(256, 8 * -(-len(texts) // 8))  # divisible by the data-parallel devices
  return run.predictor.text_embeddings(run.variables, list(texts), max_len, batch_size=batch_size)


def _batches(images: np.ndarray, batch_size: int):
  for i in range(0, len(images), batch_size):
    chunk = images[i:i + batch_size]
    pad = batch_size - len(chunk)
    yield {"image": np.concatenate([chunk, np.repeat(chunk[-1:], pad, 0)]),
           "mask": np.arange(batch_size) < len(chunk)}


def embed_images(run: Loaded, images: np.ndarray, method: str = "embed_image",
                 batch_size: int = 64) -> dict[str, np.ndarray]:
  """The model's image outputs (e.g. "zimg", or "classify" logits) for normalised images."""
  return run.predictor.image_outputs(run.variables, _batches(images, batch_size), method)


# -------------------------------------------------------------------------- pictures


def _plt():
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def _show(fig) -> None:
  """Into the notebook's output whatever the matplotlib backend, then closed."""
  from IPython.display import display  # pylint: disable=g-import-not-at-top
  display(fig)
  _plt().close(fig)


def plot_curves(workdirs: dict[str, str], title: str = ""):
  """Training loss and every evaluation metric over steps (vlpre.compare.read_run: plain
  or staged runs; a dotted line where each later stage starts). Returns the figure."""
  from vlpre import compare  # pylint: disable=g-import-not-at-top
  plt = _plt()
  runs = [compare.read_run(w, n) for n, w in workdirs.items()]
  keys = list(dict.fromkeys(k for r in runs for k in r.eval_keys  # scores only: not the
                            if not k.endswith(("/l2", "/num_examples"))))  # probe's ridge, counts
  cols = min(4, 1 + len(keys))
  rows = -(-(1 + len(keys)) // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
  for ax, key in zip(axes.flat, ["loss", *keys]):
    for run in runs:
      points = run.series(key)
      if points:
        (line,) = ax.plot(*zip(*points), marker="o" if key != "loss" else None,
                          markersize=4, label=run.name)
        for start in run.stage_starts:
          ax.axvline(start, color=line.get_color(), linestyle=":", linewidth=0.8)
    ax.set_title(key, fontsize=9)
    ax.set_xlabel("step", fontsize=8)
    ax.grid(alpha=0.3)
    if len(runs) > 1:
      ax.legend(fontsize=7)
  for ax in list(axes.flat)[1 + len(keys):]:
    ax.axis("off")
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  _show(fig)
  return fig


def results_table(workdirs: dict[str, str]):
  """vlpre.compare's table (last value of every metric per run) as notebook markdown."""
  from IPython.display import Markdown, display  # pylint: disable=g-import-not-at-top
  from vlpre import compare  # pylint: disable=g-import-not-at-top
  runs = [compare.read_run(w, n) for n, w in workdirs.items()]
  header, body = compare.table(runs)
  display(Markdown(compare.markdown(header, body)))
  return header, body


def retrieval_grid(run: Loaded, val: dict[str, Any], queries: Sequence[str] | None = None,
                   top: int = 5, max_len: int = 77):
  """Text → image retrieval: each query caption's `top` nearest images among `val`
  (`eval_images(..., captions=True)`); the image the caption belongs to is framed green.
  Default queries: the first caption of 4 images spread over `val`. Returns the figure."""
  from vlpre.evaluators import common  # pylint: disable=g-import-not-at-top
  plt = _plt()
  owners: list[int | None] = []
  if queries is None:
    picks = np.linspace(0, len(val["image"]) - 1, 4).astype(int)
    queries = [val["captions"][i][0] for i in picks]
    owners = list(picks)
  else:
    owners = [None] * len(queries)
  zimg = common.normalize(embed_images(run, val["image"])["zimg"])
  ztxt = common.normalize(embed_texts(run, queries, max_len))
  scores = ztxt @ zimg.T
  fig, axes = plt.subplots(len(queries), top, figsize=(1.9 * top, 2.2 * len(queries)),
                           squeeze=False)
  for row, (query, owner) in enumerate(zip(queries, owners)):
    best = np.argsort(-scores[row])[:top]
    for col, index in enumerate(best):
      ax = axes[row, col]
      ax.imshow(val["pixels"][index])
      ax.set_xticks([]), ax.set_yticks([])
      if owner is not None and index == owner:
        for spine in ax.spines.values():
          spine.set_edgecolor("limegreen"), spine.set_linewidth(4)
      ax.set_xlabel(f"{scores[row, index]:.2f}", fontsize=7)
    axes[row, 0].set_title(query if len(query) < 90 else query[:87] + "...", fontsize=8,
                           loc="left")
  fig.suptitle(f"text → image: top {top} of {len(val['image'])} val images", fontsize=9)
  fig.tight_layout()
  _show(fig)
  return fig


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, classnames: Sequence[str],
                     title: str):
  """Row-normalised confusion matrix (rows: true class); returns (matrix, figure)."""
  plt = _plt()
  n = len(classnames)
  matrix = np.zeros((n, n), np.int64)
  np.add.at(matrix, (labels, predictions), 1)
  rates = matrix / np.maximum(matrix.sum(1, keepdims=True), 1)
  fig, ax = plt.subplots(figsize=(5.5, 5))
  ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
  ax.set_xticks(range(n), classnames, rotation=60, ha="right", fontsize=8)
  ax.set_yticks(range(n), classnames, fontsize=8)
  for i in range(n):
    for j in range(n):
      if matrix[i, j]:
        ax.text(j, i, matrix[i, j], ha="center", va="center", fontsize=6,
                color="white" if rates[i, j] > 0.5 else "black")
  ax.set_xlabel("predicted")
  ax.set_ylabel("true")
  ax.set_title(f"{title}: top-1 {np.mean(labels == predictions):.1%} on {len(labels)}",
               fontsize=9)
  fig.tight_layout()
  _show(fig)
  return matrix, fig


def zeroshot_confusion(run: Loaded, test: dict[str, Any], classnames: Sequence[str],
                       template: str = "a photo of a {}.", max_len: int = 77):
  """Zero-shot classification of `test` (`eval_images(..., labels=True)`) by the nearest
  class prompt, as the zeroshot evaluator does; the confusion matrix and the matrix."""
  from vlpre.evaluators import common  # pylint: disable=g-import-not-at-top
  zimg = common.normalize(embed_images(run, test["image"])["zimg"])
  prompts = [template.format(c) for c in classnames]
  zcls = common.normalize(embed_texts(run, prompts, max_len))
  predictions = np.argmax(zimg @ zcls.T, axis=1)
  return confusion_matrix(test["label"], predictions, classnames, "zero-shot")


def classifier_confusion(run: Loaded, test: dict[str, Any], classnames: Sequence[str]):
  """The model's own head (`classify`) on `test`; the confusion matrix and the matrix."""
  logits = embed_images(run, test["image"], "classify")["classify"]
  return confusion_matrix(test["label"], np.argmax(logits, axis=1), classnames, "classifier")


def show_captions(run: Loaded, val: dict[str, Any], count: int = 6, max_new_tokens: int = 24):
  """Greedy captions of the first `count` images of `val` by a captioning model (the
  captioning evaluator's decoding), beside one reference caption each."""
  from vlpre.evaluators import captioning  # pylint: disable=g-import-not-at-top
  plt = _plt()
  size = val["image"].shape[1]
  evaluator = captioning.Evaluator("notebook", dict(image_size=size, max_new_tokens=max_new_tokens),
                                   run.predictor)
  images = val["image"][:count]
  texts = evaluator.captions(run.variables, next(_batches(images, 8 * -(-count // 8)))["image"])
  fig, axes = plt.subplots(1, count, figsize=(2.6 * count, 3.4), squeeze=False)
  for ax, pixels, text, refs in zip(axes[0], val["pixels"], texts, val["captions"]):
    ax.imshow(pixels)
    ax.axis("off")
    ax.set_title(f"model: {text or '(nothing)'}\nref: {refs[0]}", fontsize=6, wrap=True)
  fig.tight_layout()
  _show(fig)
  return texts[:count]
