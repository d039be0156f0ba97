"""Saves a tuned text embedder as a text-encoder recipe that every text-encoder user loads
by name (vlpre.text_encoders.recipes):

    python -m vlpre.methods.text_embedder.save --config=configs/text_embedder.py:tiny \
        --workdir=workdirs/text_embedder_tiny

reads the run's latest checkpoint (its trainable weights; the frozen rest is the base
model's), folds the adapters into the weights and writes the recipe folder
`<recipes dir>/<text_embedder.recipe>` (--out: another folder). Then, e.g.:

    python -m vlpre.methods.lift.text_score --config=configs/lift.py:tiny,tuned
"""
from __future__ import annotations

import os
import sys

from absl import app
from absl import flags
from absl import logging
from flax import traverse_util
from ml_collections import config_flags

from vlpre import checkpoint
from vlpre.methods.text_embedder import model as model_lib
from vlpre.nn import lora
from vlpre.text_encoders import recipes


def save_recipe(config, workdir: str, out: str | None = None) -> recipes.Recipe:
  """The recipe of `workdir`'s latest checkpoint, written to `out` (default: by name)."""
  llm = model_lib.load_llm(config)
  trained = checkpoint.restore_params(workdir, ("encoder",), what="--workdir")
  trained = trained["encoder"]["backbone"]
  flat = traverse_util.flatten_dict(llm.params, sep="/")
  flat.update(traverse_util.flatten_dict(trained, sep="/"))
  params = lora.merge(traverse_util.unflatten_dict(flat, sep="/"),
                      float(config.text_embedder.lora_alpha))
  hf_config = llm.hf_config
  if llm.config.num_layers != hf_config.num_hidden_layers:  # a truncated base (llm.num_layers)
    hf_config = type(hf_config)(**{**hf_config.to_dict(),
                                   "num_hidden_layers": llm.config.num_layers})
  out = out or os.path.join(recipes.recipes_dir(), config.text_embedder.recipe)
  recipe = recipes.save(out, params=params, hf_config=hf_config, tokenizer=llm.tokenizer,
                        **model_lib.recipe_settings(config),
                        tuned={**model_lib.tuned_settings(config), "workdir": workdir})
  logging.info("saved text-encoder recipe %s (digest %s)", out, recipe.digest[:8])
  return recipe


_CONFIG = None


def main(argv):
  del argv
  logging.set_verbosity(logging.INFO)
  try:
    recipe = save_recipe(_CONFIG.value, _WORKDIR.value, _OUT.value or None)
  except (ValueError, FileNotFoundError) as e:  # no checkpoint, a config that does not fit it
    print(f"vlpre.methods.text_embedder.save: {e}", file=sys.stderr)
    sys.exit(1)
  print(recipe.directory)


if __name__ == "__main__":
  # Flags are defined here, not on import: other modules define flags of the same names.
  _WORKDIR = flags.DEFINE_string("workdir", None, "the tuning run's workdir")
  _OUT = flags.DEFINE_string("out", "", "the recipe folder (default: the recipes dir / "
                             "config.text_embedder.recipe)")
  _CONFIG = config_flags.DEFINE_config_file("config", None, "A text_embedder config.")
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
