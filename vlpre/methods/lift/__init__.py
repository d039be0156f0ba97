"""LIFT: an image tower trained against a frozen LLM text encoder's caption embeddings,
online or from a precomputed store (README.md beside this file)."""
from vlpre import methods
from vlpre.methods.lift import model

METHOD = methods.Method(
    name="lift",
    Model=model.Model,
    build=model.build,
    input_extras=model.input_extras,
    build_tokenizer=model.build_tokenizer,
    reads_embedding_store=model.reads_embedding_store,
    pretrained=(methods.PretrainedField("text_encoder", "name", recipes=True),),
    export_tower=methods.ExportTower(
        "img", lambda m: {**m["image"], "pool": "mean"}, {"fc1": "head_in", "fc2": "head_out"},
        "embedding_BxE = fc2(gelu_tanh(fc1(pooled_BxD))), torch Linear layers and "
        "GELU's tanh approximation (L2-normalise it to score against texts)",
        record=lambda config: {"text_encoder": config.text_encoder.to_dict()}),
    compare=(methods.CompareRun("LIFT", "lift", (
        ("vlpre.embed", "--config=configs/lift.py:tiny", "--workdir={dir}"),
        ("vlpre.main", "--config=configs/lift.py:tiny", "--config.total_steps={steps}",
         "--workdir={dir}")), order=2),),
    notebook="lift",
)
