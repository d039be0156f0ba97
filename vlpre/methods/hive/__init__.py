"""HIVE: a ViT pre-trained through a captioning LLM that cross-attends to several of its
blocks, in three stages (README.md beside this file)."""
from vlpre import methods
from vlpre.methods.hive import model

METHOD = methods.Method(
    name="hive",
    Model=model.Model,
    build=model.build,
    build_tokenizer=model.build_tokenizer,
    pretrained=(methods.PretrainedField("hive.llm", "name"),),
    # Its ViT starts from the comparison's LIFT run (`--option=hive.init=` empty: from
    # scratch); `--option=hive.stage_steps=N|N/N/N` shortens its three stages.
    compare=(methods.CompareRun("HIVE", "hive", (
        ("vlpre.main", "--config=configs/hive.py:tiny{arg:stage_steps}",
         "--config.init_from.workdir={opt:init={root}/lift}", "--workdir={dir}"),), order=4),),
    notebook="hive",
)
