"""Method discovery: each folder's descriptor, defaults, aliases, and a method from outside
the package (by config alone) trained end to end."""
import math
import sys
import textwrap

import ml_collections
import pytest

from vlpre import check, export, losses, methods, metrics, train
from vlpre.data import tokenizers
from vlpre.methods.gpt4image import model as classifier
from vlpre.methods.lift import model as lift
from vlpre.methods.two_tower import model as two_tower

from tests import helpers


def test_every_folder_describes_itself():
  names = methods.folder_names()
  assert {"two_tower", "lift", "gpt4image", "lcl", "hive", "bridge", "lm"} <= set(names)
  for method in methods.all_methods():
    assert method.name in names and isinstance(method, methods.Method)
    assert method is methods.get(method.name)


def test_a_descriptor_passes_its_functions_through():
  for name, module in (("lift", lift), ("gpt4image", classifier)):
    method = methods.get(name)
    assert method.Model is module.Model
    assert method.build is module.build
    assert method.input_extras is module.input_extras
    assert method.build_tokenizer is module.build_tokenizer


def test_an_alias_names_the_same_method():
  assert methods.get("classifier") is methods.get("gpt4image")


def test_a_descriptor_with_only_a_model_gets_the_defaults():
  method = methods.get("two_tower")
  assert method.Model is two_tower.Model
  config = ml_collections.ConfigDict({
      "model_name": "two_tower", "dtype": "bfloat16",
      "model": {"image": {"patch_size": 8, "width": 16, "depth": 1, "num_heads": 2,
                          "mlp_dim": 32},
                "text": {"vocab_size": 64, "width": 16, "depth": 1, "num_heads": 2,
                         "mlp_dim": 32},
                "embed_dim": 8},
      "tokenizer": {"name": "clip_bpe", "bpe_path": "/no/such/bpe.txt.gz"}})
  built = methods.build(config)
  assert isinstance(built.model, two_tower.Model) and built.model.dtype == "bfloat16"
  assert built.pretrained is None and built.logical_axes is None
  assert methods.input_extras(config) == methods.InputExtras()
  tokenizer = methods.build_tokenizer(config)
  # The config's keyword arguments reach the factory (built lazily: the path is not read).
  assert isinstance(tokenizer, tokenizers.ClipBpeTokenizer)
  assert tokenizer._bpe_path == "/no/such/bpe.txt.gz"  # pylint: disable=protected-access
  config.tokenizer = None
  assert methods.build_tokenizer(config) is None


def test_unknown_or_incomplete_methods_are_one_line_errors(tmp_path, monkeypatch):
  with pytest.raises(ValueError, match="expected a folder vlpre/methods/nope/"):
    methods.get("nope")
  with pytest.raises(ValueError, match="no method module 'nosuchpkg.method'"):
    methods.get("nosuchpkg.method")
  (tmp_path / "halfpkg").mkdir()
  (tmp_path / "halfpkg" / "__init__.py").write_text("")
  (tmp_path / "halfpkg" / "half.py").write_text("class Model:\n  pass\n")
  monkeypatch.syspath_prepend(str(tmp_path))
  with pytest.raises(ValueError, match="defines no `METHOD"):
    methods.get("halfpkg.half")


def test_losses_are_shared_plus_the_methods_own():
  lcl = methods.get("lcl")
  assert "lcl_contrastive" in lcl.losses and "lcl_contrastive" not in losses.LOSSES
  assert {"lcl_contrastive", "clip"} <= set(losses.available(lcl.losses))
  with pytest.raises(ValueError, match="unknown losses"):
    losses.build_loss({"lcl_contrastive": 1.0})  # not without the method's losses
  with pytest.raises(ValueError, match="defined twice"):
    losses.available({"clip": losses.cosine_loss})


def test_export_towers_come_from_the_descriptors():
  exportable = {m.name for m in methods.all_methods() if m.export_tower}
  assert exportable == {"two_tower", "lift", "gpt4image"}
  config = ml_collections.ConfigDict({"model_name": "lcl", "model": {}})
  with pytest.raises(ValueError, match="no exportable image tower"):
    export.tower_of(config)
  config = ml_collections.ConfigDict({"model_name": "classifier", "model": {"backbone": "resnet18"}})
  with pytest.raises(ValueError, match="not a ViT"):
    export.tower_of(config)


def test_check_validates_every_methods_pretrained_models(data_dir):
  """Each descriptor's `pretrained` fields are checked: an unknown name is reported under
  its own field, LCL's `lcl.llm.name` included."""
  cases = {"lift": "text_encoder.name", "lcl": "lcl.llm.name", "hive": "hive.llm.name",
           "bridge": "bridge.llm.name", "lm": "llm.name", "gpt4image": "text_encoder.name"}
  for method in methods.all_methods():
    for spec in method.pretrained:
      config = helpers.tiny_clip_config(data_dir)
      config.model_name = method.name
      *outer, last = spec.section.split(".")
      section = config
      for part in outer:  # a dotted section: the method's own, holding an LLM section
        section[part] = section.get(part) or {}
        section = section[part]
      section[last] = {spec.field: "no-such-model-xyz"}
      if spec.used is not None:
        config.describe = {**config.get("describe", {}), "backend": "llm-class-prompts"}
      problems = [p for p in check.check_config(config) if p.startswith(f"{spec.section}.")]
      assert problems and problems[0].startswith(f"{spec.section}.{spec.field}:"), (method.name, problems)
  declared = {m.name: {f"{s.section}.{s.field}" for s in m.pretrained} for m in methods.all_methods()}
  for name, field in cases.items():
    assert field in declared[name], (name, declared[name])


TOY_METHOD = textwrap.dedent('''
    """A toy method outside vlpre: mean-pooled pixels → linear classifier."""
    import flax.linen as nn
    import jax.numpy as jnp

    from vlpre import methods


    def toy_l2(outputs, batch):
      del batch
      return jnp.mean(outputs["score"] ** 2), {}


    class Model(nn.Module):
      width: int = 4
      dtype: object = jnp.float32

      @nn.compact
      def __call__(self, batch, *, train):
        pooled_BxC = batch["image"].mean(axis=(1, 2))
        return {"score": nn.Dense(self.width, dtype=self.dtype)(pooled_BxC)}


    METHOD = methods.Method(name="toy", Model=Model, losses={"toy_l2": toy_l2})
''')


@pytest.mark.integration
def test_a_method_from_a_user_folder_trains_by_config_alone(tmp_path, monkeypatch, data_dir):
  package = tmp_path / "userpkg"
  package.mkdir()
  (package / "__init__.py").write_text("")
  (package / "toy.py").write_text(TOY_METHOD)
  monkeypatch.syspath_prepend(str(tmp_path))
  config = helpers.tiny_clip_config(data_dir, total_steps=2)
  config.model_name = "userpkg.toy"
  config.model = {"width": 4}
  config.losses = {"toy_l2": 1.0}
  config.evals = {}
  assert check.check_config(config) == []
  final = train.run(config, str(tmp_path / "run"))
  assert math.isfinite(final["loss"])
  rows = metrics.read_metrics(str(tmp_path / "run"))
  assert max(r["step"] for r in rows) == 2 and "toy_l2/loss" in rows[-1]
  assert "userpkg.toy" in sys.modules
