"""Text embedder: a decoder LLM tuned into a text embedder with InfoNCE over caption pairs,
saved as a text-encoder recipe LIFT loads by name (README.md beside this file)."""
from vlpre import methods
from vlpre.methods.text_embedder import losses
from vlpre.methods.text_embedder import model

METHOD = methods.Method(
    name="text_embedder",
    Model=model.Model,
    build=model.build,
    input_extras=model.input_extras,
    build_tokenizer=model.build_tokenizer,
    losses=losses.LOSSES,
    pretrained=(methods.PretrainedField("llm", "name"),),
)
