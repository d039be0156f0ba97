"""LCL: latent compression learning on interleaved image-text documents: a ViT and a causal
model trained with a contrastive and a generation loss (README.md beside this file)."""
from vlpre import methods
from vlpre.methods.lcl import losses
from vlpre.methods.lcl import model

_INTERLEAVED = "workdirs/data/flickr8k_interleaved"

METHOD = methods.Method(
    name="lcl",
    Model=model.Model,
    build=model.build,
    build_tokenizer=model.build_tokenizer,
    input_extras=model.input_extras,
    losses=losses.LOSSES,
    pretrained=(methods.PretrainedField("lcl.llm", "name"),),
    compare=(methods.CompareRun("LCL", "lcl", (
        ("vlpre.data.convert", "--mode=interleaved", "--pairs=flickr8k/train-*.tar",
         f"--out_dir={_INTERLEAVED}", "--split=train", "--skip_existing"),
        ("vlpre.main", "--config=configs/lcl.py:tiny", "--config.total_steps={steps}",
         "--workdir={dir}")), order=3),),
    notebook="lcl",
)
