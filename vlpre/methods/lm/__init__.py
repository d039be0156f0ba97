"""Language modelling with a pretrained decoder LLM (vlpre.llm): the trainer's LLM path,
e.g. partial freezing by layer groups (README.md beside this file)."""
from vlpre import methods
from vlpre.methods.lm import model

METHOD = methods.Method(
    name="lm",
    Model=model.Model,
    build=model.build,
    build_tokenizer=model.build_tokenizer,
    pretrained=(methods.PretrainedField("llm", "name"),),
)
