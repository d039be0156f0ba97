"""CLIP, SigLIP and LiT: an image tower and a text tower trained (or, for LiT, one frozen)
into one embedding space with a contrastive loss (README.md beside this file)."""
from vlpre import methods
from vlpre.methods.two_tower import model

METHOD = methods.Method(
    name="two_tower",
    Model=model.Model,
    export_tower=methods.ExportTower(
        "img", lambda m: dict(m["image"]), {"proj": "img_head"},
        "embedding_BxE = proj(pooled_BxD), a torch Linear without bias "
        "(L2-normalise it to score against texts)"),
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
