"""A decoder LLM's folder without its weights: config.json and a tokenizer, all that
`vlpre.compile` reads of a pretrained model (its build runs under `vlpre.llm.abstract_weights`).

    python bench/shapes_only_llm.py --out=workdirs/mistral-7b-shapes
    python -m vlpre.compile --config=configs/lift.py --config.text_mode=online \
        --config.text_encoder.name=workdirs/mistral-7b-shapes --topology=v5p:4x4x4

The preset is Mistral-7B-v0.1's architecture (NV-Embed-v2's backbone, LIFT's 7B
embedder); the tokenizer is SmolLM2's, the packaged offline one: token ids do not change
a step's shapes. With the real model at hand, its own config.json and tokenizer files
(a few MB of its hub repository, no weights) serve the same way.
"""
from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

from vlpre import llm as llm_lib  # noqa: E402

# transformers config fields, as the model's own config.json has them.
PRESETS = {
    "mistral-7b": dict(model_type="mistral", vocab_size=32_000, hidden_size=4096,
                       intermediate_size=14_336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, head_dim=128, max_position_embeddings=32_768,
                       rms_norm_eps=1e-5, rope_theta=10_000.0, sliding_window=4096,
                       hidden_act="silu", tie_word_embeddings=False),
}


def hf_config(fields: dict):
  import transformers  # pylint: disable=g-import-not-at-top  (heavy: HF configs only)
  fields = dict(fields)
  return transformers.AutoConfig.for_model(fields.pop("model_type"), **fields)


def write(out: str, fields: dict, tokenizer_from: str = "smollm2-135m") -> str:
  """Writes config.json (transformers `fields`) and `tokenizer_from`'s tokenizer to `out`."""
  from transformers import PreTrainedTokenizerFast  # pylint: disable=g-import-not-at-top
  with llm_lib.abstract_weights():  # the tokenizer only: no weight is read
    tokenizer = llm_lib.read_source(tokenizer_from).tokenizer
  os.makedirs(out, exist_ok=True)
  hf_config(fields).save_pretrained(out)
  eos = tokenizer.backend.id_to_token(tokenizer.eos_id)
  PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend, eos_token=eos,
                          pad_token=eos).save_pretrained(out)
  return out


def main(argv):
  del argv
  print(write(_OUT.value, PRESETS[_PRESET.value]))


if __name__ == "__main__":
  _OUT = flags.DEFINE_string("out", "workdirs/mistral-7b-shapes", "The folder to write.")
  _PRESET = flags.DEFINE_enum("preset", "mistral-7b", sorted(PRESETS), "The architecture.")
  app.run(main)
