"""CLIP, SigLIP and LiT: an image tower and a text tower trained (or, for LiT, one frozen)
into one embedding space with a contrastive loss (README.md beside this file)."""
from vlpre import methods
from vlpre.methods.two_tower import model


def _options(model_config: dict) -> dict:
  net = model.Model(**model_config)
  return dict(image=dict(net.image), text=dict(net.text), embed_dim=net.embed_dim,
              image_head=net.image_head, image_head_bias=net.image_head_bias,
              text_head_bias=net.text_head_bias, logit_bias=net.logit_bias_init is not None)


METHOD = methods.Method(
    name="two_tower",
    Model=model.Model,
    export_tower=methods.ExportTower(
        "img", lambda m: dict(m["image"]), {"proj": "img_head"},
        "embedding_BxE = proj(pooled_BxD), a torch Linear without bias "
        "(L2-normalise it to score against texts)"),
    two_towers=methods.TwoTowers(_options),
    compare=(
        methods.CompareRun("CLIP", "clip", (
            ("vlpre.main", "--config=configs/clip.py:tiny", "--config.total_steps={steps}",
             "--workdir={dir}"),), order=0),
        methods.CompareRun("SigLIP", "siglip", (
            ("vlpre.main", "--config=configs/siglip.py:tiny", "--config.total_steps={steps}",
             "--workdir={dir}"),), order=1),
    ),
    notebook="clip_siglip",
)
