"""Captioning: decode a caption for each image of a captioned split, score BLEU-4 and CIDEr.

For captioning models (HIVE / SA, LCL): the model's `caption_inputs(image)` returns what
conditions its LLM on the image —
  prompt_ids   [B, P] int, the prompt's tokens (placeholders where embeddings go);
  embeddings   [B, P, D] and embeddings_mask [B, P] (optional): input embeddings;
  extra_kv     {layer: ExtraKV} (optional): keys/values added to those layers —
and the method's `build` hands over the LLM to decode with (`Built.llm`). Decoding is
greedy by default (`beam_width` > 0: beam search), at most `max_new_tokens` tokens, up to
the LLM's stop tokens; the references are every caption of the image. Scores as the COCO
caption evaluation computes them (caption_metrics.py), reported ×100 like papers do.

cfg: data (glob), image_size, resize_size, batch_size, max_examples, max_new_tokens,
beam_width, examples (how many (reference, generated) pairs to log).
"""
from __future__ import annotations

from absl import logging
import jax
import numpy as np

from vlpre import sharding
from vlpre.evaluators import caption_metrics
from vlpre.evaluators import common
from vlpre.llm import generate as generate_lib


class Evaluator:

  def __init__(self, name, cfg, predictor: common.Predictor):
    self.name, self.cfg, self.predictor = name, cfg, predictor
    setup = predictor.setup
    if setup.built.llm is None or not hasattr(setup.model, "caption_inputs"):
      raise ValueError(f"evals.{name}: captioning needs a model with `caption_inputs` and an "
                       f"LLM in its Built (model {type(setup.model).__module__})")
    self._inputs = jax.jit(lambda v, image: setup.model.apply(v, image,
                                                              method="caption_inputs"))

  def captions(self, variables, images_BxHxWx3) -> list[str]:
    """Decoded captions of a batch of images."""
    cfg, setup = self.cfg, self.predictor.setup
    llm = setup.built.llm
    with sharding.active(setup.mesh, setup.rules):
      cond = self._inputs(variables, np.asarray(images_BxHxWx3))
    prompts = np.asarray(cond["prompt_ids"]).tolist()
    out = generate_lib.generate(
        llm, prompts, max_new_tokens=cfg.get("max_new_tokens", 24),
        beam_width=cfg.get("beam_width", 0), params=variables["params"]["llm"],
        embeddings=cond.get("embeddings"), embeddings_mask=cond.get("embeddings_mask"),
        extra_kv=cond.get("extra_kv"))
    return [llm.tokenizer.decode(rows[0], skip_special_tokens=True).strip() for rows in out]

  def run(self, variables) -> dict[str, float]:
    cfg = self.cfg
    generated, references = {}, {}
    for batch in common.eval_batches(cfg, cfg["data"], max_examples=cfg.get("max_examples", 0),
                                     with_captions=True):
      keep = np.asarray(batch["mask"], bool)
      texts = self.captions(variables, batch["image"])
      for text, refs, real in zip(texts, batch["captions"], keep):
        if real:
          key = len(generated)
          generated[key], references[key] = text, list(refs)
    for key in list(generated)[:cfg.get("examples", 3)]:
      logging.info("%s: %r (reference: %r)", self.name, generated[key], references[key][0])
    scores = caption_metrics.score(generated, references)
    return {f"{self.name}/bleu4": 100 * scores["bleu4"], f"{self.name}/cider": 100 * scores["cider"],
            f"{self.name}/num_examples": float(len(generated))}
