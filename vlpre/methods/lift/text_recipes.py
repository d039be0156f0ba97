"""Text-side table: caption↔caption R@1 on Flickr8k val for each text-embedding recipe.

    python -m vlpre.methods.lift.text_recipes [--max_images 500] [--out vlpre/methods/lift/text_recipes.md]

For SmolLM2-135M-Instruct, each template runs the decoder once per batch with every
layer's output kept (`return_all_hidden`), so all (layer, pooling, centring) choices of
a template cost one forward pass; all-MiniLM-L6-v2 is scored with its native mean
pooling and with CLS. Scoring: vlpre.methods.lift.text_score.caption_retrieval (a caption's four
siblings are its positives). Prints a markdown table and the best SmolLM2 recipe.
"""
from __future__ import annotations

import argparse
import functools
import time

import jax
import numpy as np

from vlpre import text_encoders
from vlpre.methods.lift import text_score
from vlpre.data import text_batching
from vlpre.text_encoders import pooling

TEMPLATES = {
    "caption + EOS": ("{text}", True),
    "caption": ("{text}", False),
    "PromptEOL": ('This sentence : "{text}" means in one word:"', False),
    "FLAME": ('This image description : "{text}" means in just one word:"', False),
}
LAYERS = (6, 9, 12, 15, 18, 21, 24, 27, -1)  # -1: the final, normed output


def smollm2_rows(texts, owner, max_len, batch_size):
  rows = []
  for name, (template, append_eos) in TEMPLATES.items():
    start = time.perf_counter()
    encoder = text_encoders.load_text_encoder("smollm2-135m", max_len=max_len, template=template,
                                              append_eos=append_eos, normalize=False)
    decoder, params = encoder.module.backbone, {"params": encoder.params["backbone"]}
    apply = jax.jit(functools.partial(decoder.apply, return_all_hidden=True))
    ids_NxL, mask_NxL = encoder.tokenizer.encode_batch(texts, max_len)
    pooled = {(layer, kind): np.zeros((len(texts), encoder.dim), np.float32)
              for layer in LAYERS for kind in ("last", "mean")}
    for index, ids_BxL, mask_BxL in text_batching.bucketed_batches(ids_NxL, mask_NxL, batch_size):
      out = apply(params, ids_BxL, mask_BxL)
      for layer in LAYERS:
        hidden = out.hidden if layer == -1 else out.all_hidden[layer]
        for kind in ("last", "mean"):
          pooled[(layer, kind)][index] = np.asarray(pooling.pool_hidden_states(
              hidden, ids_BxL, mask_BxL, kind))[:len(index)]
    for (layer, kind), emb in pooled.items():
      for center in (False, True):
        r = text_score.caption_retrieval(emb, owner, center=center)
        rows.append(dict(model="SmolLM2-135M", template=name, layer=layer, pooling=kind,
                         centred=center, **r))
    print(f"{name}: {time.perf_counter() - start:.0f}s", flush=True)
  return rows


def minilm_rows(texts, owner, max_len, batch_size):
  rows = []
  for kind in ("mean", "cls"):
    encoder = text_encoders.load_text_encoder("minilm-l6", max_len=max_len, pooling=kind)
    emb = encoder.embed(texts, batch_size=batch_size)
    for center in (False, True):
      rows.append(dict(model="all-MiniLM-L6-v2", template="caption", layer=-1, pooling=kind,
                       centred=center, **text_score.caption_retrieval(emb, owner, center=center)))
  return rows


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--max_images", type=int, default=0)
  parser.add_argument("--max_len", type=int, default=77)
  parser.add_argument("--batch_size", type=int, default=64)
  parser.add_argument("--out", default="")
  args = parser.parse_args()
  texts, owner = text_score.split_captions("flickr8k/val-*.tar", max_images=args.max_images)
  chance = 4 / (len(texts) - 1)
  start = time.perf_counter()
  rows = minilm_rows(texts, owner, args.max_len, args.batch_size)
  rows += smollm2_rows(texts, owner, args.max_len, args.batch_size)
  lines = [f"Caption↔caption retrieval, Flickr8k val, {len(set(owner.tolist()))} images × 5 = "
           f"{len(texts)} captions (chance R@1 {100 * chance:.2f}); "
           f"wall time {time.perf_counter() - start:.0f} s.", "",
           "| model | template | layer | pooling | centred | R@1 | R@5 |",
           "|---|---|---|---|---|---|---|"]
  for r in rows:
    layer = "last (normed)" if r["layer"] == -1 else str(r["layer"])
    lines.append(f"| {r['model']} | {r['template']} | {layer} | {r['pooling']} | "
                 f"{'yes' if r['centred'] else 'no'} | {100 * r['R@1']:.1f} | {100 * r['R@5']:.1f} |")
  best = max((r for r in rows if r["model"].startswith("SmolLM2")), key=lambda r: r["R@1"])
  lines += ["", f"Best SmolLM2 recipe: {best}"]
  text = "\n".join(lines)
  print(text)
  if args.out:
    with open(args.out, "w", encoding="utf-8") as f:
      f.write(text + "\n")


if __name__ == "__main__":
  main()
