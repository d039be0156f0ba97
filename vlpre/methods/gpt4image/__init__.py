"""GPT4Image: a supervised classifier with LLM-written descriptions of its images as extra
supervision through a frozen text encoder (README.md beside this file)."""
from vlpre import methods
from vlpre.methods.gpt4image import model


def _export_problem(model_config: dict) -> str | None:
  backbone = model_config.get("backbone", "resnet18")
  if backbone != "vit":
    return f"backbone '{backbone}' is not a ViT; only the classifier's ViT backbone is exported"
  return None


METHOD = methods.Method(
    name="gpt4image",
    aliases=("classifier",),  # configs name its model by what it is: a classifier
    Model=model.Model,
    build=model.build,
    input_extras=model.input_extras,
    build_tokenizer=model.build_tokenizer,
    reads_embedding_store=model.text_loss_enabled,  # the CE-only baseline embeds nothing
    pretrained=(methods.PretrainedField("text_encoder", "name", recipes=True),
                methods.PretrainedField(
                    "describe.llm", "name",
                    lambda config: config.describe.get("backend") == "llm-class-prompts")),
    export_tower=methods.ExportTower(
        "vit", lambda m: {"pool": "cls", **(m.get("vit") or {})}, {"classifier": "head"},
        "logits_BxC = classifier(pooled_BxD), a torch Linear", _export_problem),
    compare=(methods.CompareRun("GPT4Image", "gpt4image", (
        ("vlpre.methods.gpt4image.describe", "--config=configs/gpt4image.py:tiny"),
        ("vlpre.embed", "--config=configs/gpt4image.py:tiny"),
        ("vlpre.main", "--config=configs/gpt4image.py:tiny", "--config.total_steps={steps}",
         "--workdir={dir}")), order=6),),
    notebook="gpt4image",
)
