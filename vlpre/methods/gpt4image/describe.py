"""GPT4Image stage 1: a text description for every training image.

    python -m vlpre.methods.gpt4image.describe --config=configs/gpt4image.py:tiny
    python -m vlpre.embed    --config=configs/gpt4image.py:tiny    # stage 2: embed them
    python -m vlpre.main     --config=configs/gpt4image.py:tiny --workdir=...   # stage 3

Writes to `config.describe.output_dir`:
  descriptions.jsonl  one {"key": <sample key>, "description": <text>} per line, every
                      training image covered (stage 2 reads it with `read_descriptions`);
  meta.json           the describer and its settings, written last with "complete": true.
A rerun with the same settings is a no-op; other settings into the same directory are
an error (nothing is silently overwritten).

Backends (`config.describe.backend`):
  precomputed        a JSONL of {"key", "description"} written elsewhere (the paper:
                     MiniGPT-4 over every training image), validated here: every training
                     key covered, descriptions non-empty UTF-8.
  llm-class-prompts  the packaged SmolLM2-135M-Instruct writes `per_class` varied visual
                     descriptions of each class from its NAME (chat prompt, temperature
                     sampling; KV-cache decoding on vlpre's one decoder, vlpre.llm);
                     each image gets one of its class's descriptions, picked by a
                     hash of its key. The text target is then a function of the label only,
                     unlike the paper's per-image descriptions: see this folder's README.md.
  vlpre-captioner    a trained vlpre captioning model (HIVE / SA, or any method with
                     `caption_inputs`) writes one caption FROM EACH TRAINING IMAGE, the
                     paper's mechanism: `describe.captioner` names its config and workdir
                     (a staged run's last stage, or the latest checkpoint of a plain run);
                     greedy decoding, `max_new_tokens` tokens at most.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Sequence

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags
import tqdm

from vlpre import checkpoint, config_lib, data, init_params, methods, optim, stages, train_state
from vlpre import llm as llm_lib
from vlpre import storage
from vlpre.evaluators import captioning, common
from vlpre.llm import generate as generate_lib
from vlpre.text_encoders import store

BACKENDS = ("precomputed", "llm-class-prompts", "vlpre-captioner")

# The system turn of the chat prompt; short, because a 135M model follows short prompts best.
DEFAULT_SYSTEM = "You are a helpful assistant who describes what things look like in photos."
# User turns, cycled over a class's samples so its descriptions look at different aspects.
DEFAULT_PROMPTS = (
    "Describe in one sentence what a photo of a {} looks like: its shape, colors and "
    "surroundings.",
    "In one short sentence, describe the visual appearance of a {} in a photograph.",
    "Write one sentence describing a typical picture of a {} and where it is.",
    "Give a one-sentence visual description of a {}, as seen in a small color photo.",
)


# ------------------------------------------------------------------------------ settings


def _file_sha1(path: str) -> str:
  digest = hashlib.sha1()
  with storage.path(path, what="describe.precomputed").open("rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      digest.update(chunk)
  return digest.hexdigest()


def describer_settings(config) -> dict[str, Any]:
  """What the descriptions depend on; a rerun with equal settings skips the work."""
  d = config.describe
  if d.backend not in BACKENDS:
    raise ValueError(f"describe.backend must be one of {BACKENDS}, got {d.backend!r}")
  settings: dict[str, Any] = {"backend": d.backend, "train": str(config.input.train)}
  if d.backend == "precomputed":
    if not d.get("precomputed"):
      raise ValueError("describe.backend='precomputed' needs describe.precomputed: a JSONL "
                       'of {"key": ..., "description": ...}')
    # The content, not the path, identifies the descriptions: a moved file still matches.
    settings.update(source=os.path.basename(d.precomputed), sha1=_file_sha1(d.precomputed))
  elif d.backend == "vlpre-captioner":
    cap = d.get("captioner") or {}
    if not cap.get("config") or not cap.get("workdir"):
      raise ValueError("describe.backend='vlpre-captioner' needs describe.captioner.config "
                       "(e.g. configs/hive.py:tiny) and describe.captioner.workdir (its run)")
    spec = cap["config"]  # "configs/hive.py:tiny", or a config object (tests, notebooks)
    if not isinstance(spec, str):
      spec = "inline:" + hashlib.sha1(spec.to_json(sort_keys=True).encode()).hexdigest()[:12]
    settings.update(captioner_config=spec, captioner_workdir=cap["workdir"],
                    max_new_tokens=int(d.max_new_tokens))
  elif d.backend == "llm-class-prompts":
    # The LLM by name, as descriptions written before `describe.llm` became a section
    # record it; the section's other fields only where they differ from the defaults.
    section = llm_lib.config_section(**dict(d.llm))
    options = {k: list(v) if isinstance(v, tuple) else v  # as meta.json reads back
               for k, v in section.items() if k != "name" and v != llm_lib.SECTION[k]}
    settings.update(llm=section["name"], **({"llm_options": options} if options else {}))
    settings.update(classnames=d.classnames, per_class=int(d.per_class),
                    max_new_tokens=int(d.max_new_tokens), temperature=float(d.temperature),
                    top_k=int(d.top_k), seed=int(d.seed), system=d.get("system") or DEFAULT_SYSTEM,
                    prompts=list(d.get("prompts") or DEFAULT_PROMPTS))
  return settings


def describer_name(meta: dict[str, Any]) -> str:
  """A one-line name of the describer for tables and logs."""
  s = meta["settings"]
  if s["backend"] == "llm-class-prompts":
    return (f"{s['llm']} from class names ({s['per_class']} descriptions/class, "
            f"T={s['temperature']})")
  if s["backend"] == "vlpre-captioner":
    return f"vlpre captioner {s['captioner_config']} ({s['captioner_workdir']}), per image"
  return f"precomputed ({s['source']})"


# ------------------------------------------------------------------------------ reading


def check_coverage(descriptions: dict[str, list[str]], keys: Sequence[str], path: str) -> None:
  missing = [k for k in keys if k not in descriptions]
  if missing:
    raise ValueError(f"{path}: {len(missing)} of {len(keys)} training images have no "
                     f"description, e.g. {missing[:5]}")


def training_samples(config) -> tuple[list[str], list[int | None]]:
  """Keys (in source order) and labels (None where a sample has no .cls) of the train split."""
  source = data.make_source(config.input, labels=True, captions=False)
  keys, labels = [], []
  for i in range(len(source)):
    record = source[i]
    keys.append(record["__key__"])
    labels.append(int(record["cls"]) if "cls" in record else None)
  return keys, labels


# ----------------------------------------------------------------------- generation


def chat_prompt(user: str, system: str) -> str:
  """ChatML, the chat format of SmolLM2 (and Qwen) instruct models, ready for the answer."""
  return (f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n"
          "<|im_start|>assistant\n")


def load_llm(section):
  """The LLM `section` names, with its LM head, on vlpre's one decoder (vlpre.llm; cached)."""
  return llm_lib.from_config(section, max_len=8)


def generate(llm_section: dict[str, Any], prompts: Sequence[str], *, samples_per_prompt: int,
             max_new_tokens: int, temperature: float, top_k: int, seed: int,
             progress: bool = True) -> list[list[str]]:
  """`samples_per_prompt` completions of each (already chat-formatted) prompt by the LLM
  the section `llm_section` names (vlpre.llm.SECTION's shape).

  Decoding is `vlpre.llm.generate` (KV cache, each prompt prefilled once).

  Returns:
    For each prompt, its completions (decoded, special tokens dropped).
  """
  llm = load_llm(llm_section)
  tokenizer = llm.tokenizer
  prompt_ids = [tokenizer.encode(p) for p in prompts]
  bar = tqdm.tqdm(total=max_new_tokens, disable=not progress, desc="generating", leave=False)
  outputs = generate_lib.generate(
      llm, prompt_ids, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
      num_samples=samples_per_prompt, seed=seed, progress=lambda _: bar.update())
  bar.close()
  return [[tokenizer.decode(ids, skip_special_tokens=True) for ids in rows] for rows in outputs]


def clean_description(text: str) -> str:
  """One line; a completion cut off by the token limit ends at its last full sentence."""
  text = " ".join(text.replace("*", " ").split()).strip().strip('"').strip()
  if text and text[-1] not in ".!?":
    cut = max(text.rfind(". "), text.rfind("! "), text.rfind("? "))
    if cut > 0:
      text = text[:cut + 1]
  return text


def class_descriptions(settings: dict[str, Any], classnames: Sequence[str], *,
                       progress: bool = True, max_rounds: int = 4) -> list[list[str]]:
  """`per_class` distinct, non-empty descriptions of each class, from its name alone.

  Sample j of a class uses prompt j mod len(prompts). Rows whose completion is empty
  or repeats an earlier one are resampled (another seed), up to `max_rounds` times.
  """
  per_class, prompts = settings["per_class"], settings["prompts"]
  result: list[list[str | None]] = [[None] * per_class for _ in classnames]
  for round_ in range(max_rounds):
    todo = [(c, j) for c in range(len(classnames)) for j in range(per_class)
            if result[c][j] is None]
    if not todo:
      break
    # One prompt per (class, template); a row per missing sample of it.
    wanted: dict[tuple[int, int], list[int]] = {}
    for c, j in todo:
      wanted.setdefault((c, j % len(prompts)), []).append(j)
    groups = sorted(wanted)
    samples = max(len(v) for v in wanted.values())
    texts = generate({"name": settings["llm"], **settings.get("llm_options", {})},
                     [chat_prompt(prompts[p].format(classnames[c]), settings["system"])
                      for c, p in groups],
                     samples_per_prompt=samples, max_new_tokens=settings["max_new_tokens"],
                     temperature=settings["temperature"], top_k=settings["top_k"],
                     seed=settings["seed"] + 1000 * round_, progress=progress)
    for (c, _), slots, outs in zip(groups, (wanted[g] for g in groups), texts):
      for j, text in zip(slots, outs):
        text = clean_description(text)
        if text and text not in result[c]:
          result[c][j] = text
  missing = [(classnames[c], j) for c in range(len(classnames)) for j in range(per_class)
             if result[c][j] is None]
  if missing:
    raise RuntimeError(f"no usable description after {max_rounds} rounds for {missing[:5]}; "
                       "raise describe.max_new_tokens or describe.temperature")
  return result  # type: ignore[return-value]


def pick(key: str, count: int, seed: int) -> int:
  """Which of `count` descriptions an image gets: a stable hash of its key."""
  return int(hashlib.sha1(f"{seed}:{key}".encode()).hexdigest(), 16) % count


# ---------------------------------------------------------------------------------- run


def _write_atomic(path: str, lines: Sequence[str]) -> None:
  storage.write_atomic(storage.path(path), "".join(lines))  # local or gs://


def describe(config, *, progress: bool = True) -> str:
  """Runs stage 1 for `config` and returns the path of descriptions.jsonl (resumable)."""
  settings = describer_settings(config)
  out_dir = config.describe.output_dir
  meta_path = os.path.join(out_dir, "meta.json")
  path = store.descriptions_file(config)
  if storage.path(meta_path).exists():  # written last: it exists only for a complete output
    old = json.loads(storage.path(meta_path).read_text(encoding="utf-8"))
    if old["settings"] != settings:
      raise ValueError(f"{out_dir} holds descriptions made with {old['settings']}; the config "
                       f"asks for {settings}. Point describe.output_dir elsewhere.")
    if storage.path(path).exists():
      logging.info("descriptions complete in %s (%s): nothing to do", out_dir, old["describer"])
      return path
  storage.path(out_dir, what="describe.output_dir").mkdir(parents=True, exist_ok=True)
  keys, labels = training_samples(config)
  extra: dict[str, Any] = {}
  if settings["backend"] == "precomputed":
    source = config.describe.precomputed
    table = store.read_descriptions(source)
    check_coverage(table, keys, source)
    rows = [(k, text) for k in keys for text in table[k]]
  elif settings["backend"] == "vlpre-captioner":
    captions = caption_images(config, progress=progress)
    check_coverage({k: [v] for k, v in captions.items()}, keys, "the captioner's output")
    rows = [(k, captions[k]) for k in keys]
  else:
    per_class, classnames = _class_descriptions_cached(config, settings, labels, keys, progress)
    extra["class_descriptions"] = dict(zip(classnames, per_class))
    rows = [(k, per_class[y][pick(k, settings["per_class"], settings["seed"])])
            for k, y in zip(keys, labels)]

  _write_atomic(path, [json.dumps({"key": k, "description": text}, ensure_ascii=False) + "\n"
                       for k, text in tqdm.tqdm(rows, disable=not progress, desc="writing")])
  meta = {"settings": settings, "complete": True, "num_images": len(keys),
          "num_descriptions": len(rows), **extra}
  meta["describer"] = describer_name(meta)
  _write_atomic(meta_path, [json.dumps(meta, indent=1, ensure_ascii=False)])
  logging.info("wrote %d descriptions of %d images to %s (%s)", len(rows), len(keys), path,
               meta["describer"])
  return path


def caption_images(config, *, progress: bool = True) -> dict[str, str]:
  """key → a caption of that training image by the trained captioner (`describe.captioner`).

  The captioner's parameters: a staged run's last-stage export, else the latest
  checkpoint of the run (its trainable parameters over the method's pretrained ones).
  An image the captioner gives no words for is an error naming it, not an empty text.
  """
  cap = config.describe.captioner
  cap_config = cap["config"]
  cap_config = config_lib.load(cap_config) if isinstance(cap_config, str) else cap_config
  extras = methods.input_extras(cap_config)
  example = next(iter(data.build_train_dataset(
      cap_config.input, global_batch_size=cap_config.batch_size, seed=0,
      tokenizer=methods.build_tokenizer(cap_config) if extras.tokenize else None,
      extra_transforms=extras.transforms, extra_keys=extras.keys, stream=extras.stream,
      records=extras.records)))
  s = train_state.setup(cap_config, example)
  params = jax.device_get(s.variables(s.state))["params"]
  if cap_config.get("stages"):
    last = len(cap_config.stages) - 1
    params = init_params.load_params(os.path.join(
        stages.stage_dir(cap["workdir"], last, cap_config.stages[last]), "final_params"))
  else:
    params = optim.merge(params, checkpoint.restore_params(cap["workdir"], tuple(s.state.params),
                                                             what="describe.captioner.workdir"))
  variables = {**jax.device_get(s.variables(s.state)), "params": params}
  size = cap_config.input.image_size
  cfg = dict(image_size=size, resize_size=size, max_new_tokens=int(config.describe.max_new_tokens),
             batch_size=int(cap.get("batch_size", 100)))
  evaluator = captioning.Evaluator("describe", cfg, common.Predictor(s, None))
  out: dict[str, str] = {}
  batches = data.iterate_eval(data.make_source(config.input, labels=True, captions=False),
                              image_size=size, resize_size=size, batch_size=cfg["batch_size"],
                              data_dir=config.input.get("data_dir"))
  for batch in tqdm.tqdm(batches, disable=not progress, desc="captioning"):
    texts = evaluator.captions(variables, batch["image"])
    for key, text, real in zip(batch["_key"], texts, batch["mask"]):
      if real:
        out[key] = text
  empty = [k for k, v in out.items() if not v.strip()]
  if empty:
    raise ValueError(f"the captioner wrote nothing for {len(empty)} images, e.g. {empty[:5]}; "
                     "train it longer or raise describe.max_new_tokens")
  return out


def _class_descriptions_cached(config, settings, labels, keys, progress):
  """class_descriptions, saved beside the output so an interrupted run does not regenerate."""
  classnames = data.load_classnames(settings["classnames"], data_dir=config.input.get("data_dir"))
  unlabeled = [k for k, y in zip(keys, labels) if y is None or not 0 <= y < len(classnames)]
  if unlabeled:
    raise ValueError(f"llm-class-prompts needs a class label (.cls) in [0, {len(classnames)}) "
                     f"for every image; {len(unlabeled)} lack one, e.g. {unlabeled[:5]}")
  cache_path = os.path.join(config.describe.output_dir, "class_descriptions.json")
  if storage.path(cache_path).exists():
    cached = json.loads(storage.path(cache_path).read_text(encoding="utf-8"))
    if cached["settings"] == settings and cached["classnames"] == classnames:
      return cached["descriptions"], classnames
  per_class = class_descriptions(settings, classnames, progress=progress)
  _write_atomic(cache_path, [json.dumps({"settings": settings, "classnames": classnames,
                                         "descriptions": per_class}, indent=1, ensure_ascii=False)])
  return per_class, classnames


_CONFIG = None


def main(argv):
  del argv
  logging.set_verbosity(logging.INFO)
  describe(_CONFIG.value)


if __name__ == "__main__":
  _CONFIG = config_flags.DEFINE_config_file("config", None, "A GPT4Image config.")
  flags.mark_flags_as_required(["config"])
  app.run(main)
