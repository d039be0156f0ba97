"""Bridge training: pretrained LLM blocks as a vision backbone, trained on random labels
and then transferred (README.md beside this file)."""
from vlpre import methods
from vlpre.methods.bridge import model

METHOD = methods.Method(
    name="bridge",
    Model=model.Model,
    build=model.build,
    input_extras=model.input_extras,
    build_tokenizer=model.build_tokenizer,
    pretrained=(methods.PretrainedField("bridge.llm", "name"),),
    # Its two runs are the stages 0_bridge and 1_finetune of one folder, so compare reads
    # them as one staged run.
    compare=(methods.CompareRun("bridge", "bridge", (
        ("vlpre.main", "--config=configs/bridge.py:tiny", "--config.total_steps={steps}",
         "--workdir={dir}/0_bridge"),
        ("vlpre.main", "--config=configs/bridge.py:tiny,finetune", "--config.total_steps={steps}",
         "--config.init_from.workdir={dir}/0_bridge", "--workdir={dir}/1_finetune")), order=5),),
    notebook="bridge",
)
