"""The method protocol: get_method resolves a model file, filling in the defaults."""
import ml_collections
import pytest

from vlpre import models
from vlpre.data import tokenizers
from vlpre.models import classifier, lift, two_tower


def test_a_file_defining_every_member_is_used_as_is():
  for module in (lift, classifier):
    method = models.get_method(module.__name__.rsplit(".", 1)[-1])
    assert method.Model is module.Model
    assert method.build is module.build
    assert method.input_extras is module.input_extras
    assert method.build_tokenizer is module.build_tokenizer


def test_a_file_defining_only_model_gets_the_defaults():
  method = models.get_method("two_tower")
  assert method.Model is two_tower.Model
  config = ml_collections.ConfigDict({
      "model_name": "two_tower", "dtype": "bfloat16",
      "model": {"image": {"patch_size": 8, "width": 16, "depth": 1, "num_heads": 2,
                          "mlp_dim": 32},
                "text": {"vocab_size": 64, "width": 16, "depth": 1, "num_heads": 2,
                         "mlp_dim": 32},
                "embed_dim": 8},
      "tokenizer": {"name": "clip_bpe", "bpe_path": "/no/such/bpe.txt.gz"}})
  built = models.build(config)
  assert isinstance(built.model, two_tower.Model) and built.model.dtype == "bfloat16"
  assert built.pretrained is None and built.logical_axes is None
  assert models.input_extras(config) == models.InputExtras()
  tokenizer = models.build_tokenizer(config)
  # The config's keyword arguments reach the factory (built lazily: the path is not read).
  assert isinstance(tokenizer, tokenizers.ClipBpeTokenizer)
  assert tokenizer._bpe_path == "/no/such/bpe.txt.gz"  # pylint: disable=protected-access
  config.tokenizer = None
  assert models.build_tokenizer(config) is None


def test_a_file_without_model_or_no_file_is_a_clear_error():
  with pytest.raises(ValueError, match="defines no `Model`"):
    models.get_method("resnet")
  with pytest.raises(ValueError, match="expected a file vlpre/models/nope.py"):
    models.get_method("nope")
