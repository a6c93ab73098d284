from comfy_api.latest import io

from ..trainer_core.config import ALGORITHMS, TARGET_PRESETS, TEXT_ENCODER_PRESETS, LoraConfig
from .compat import ADVANCED

CATEGORY = "LoRA Trainer"


class LoraConfigNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LoraTrainer_LoraConfig",
            display_name="LoRA Config",
            category=CATEGORY,
            description="Shape of the LoRA to train: algorithm, rank, alpha, dropout, which layers it adapts and "
                        "whether the text encoders get one too.",
            inputs=[
                io.Int.Input("rank", default=16, min=1, max=256, tooltip="Rank of the LoRA matrices."),
                io.Float.Input(
                    "alpha", default=16.0, min=0.0, max=1024.0, step=0.5,
                    tooltip="Scale numerator: the LoRA output is multiplied by alpha / rank.",
                ),
                io.Float.Input(
                    "dropout", default=0.0, min=0.0, max=0.9, step=0.01,
                    tooltip="Dropout applied to the LoRA input during training.", **ADVANCED,
                ),
                io.Combo.Input(
                    "targets", options=list(TARGET_PRESETS), default="attention+mlp",
                    tooltip="Which layers of every transformer block get a LoRA.",
                ),
                io.String.Input(
                    "include", default="",
                    tooltip="Comma-separated regular expressions; only matching layers are kept.",
                    **ADVANCED,
                ),
                io.String.Input(
                    "exclude", default="", tooltip="Comma-separated regular expressions; matching layers are dropped.",
                    **ADVANCED,
                ),
                # Appended and optional: saved workflows (widget values by position, API graphs without
                # these names) load as before, as plain LoRA.
                io.Combo.Input(
                    "algorithm", options=list(ALGORITHMS), default="lora", optional=True,
                    tooltip="lora: low-rank pair (LoCon with the conv preset); loha: Hadamard product of two pairs; "
                            "lokr: Kronecker product (lokr_factor); dora: LoRA plus a learned magnitude per column.",
                ),
                io.Int.Input(
                    "lokr_factor", default=-1, min=-1, max=1024, optional=True,
                    tooltip="LoKr only: size of the small Kronecker factor; -1 picks the divisor nearest the square "
                            "root (fewest weights), larger gives a larger second factor.",
                    **ADVANCED,
                ),
                io.Boolean.Input(
                    "lokr_full_rank", default=False, optional=True,
                    tooltip="LoKr only: keep the large Kronecker factor a full matrix instead of a rank-`rank` pair.",
                    **ADVANCED,
                ),
                io.Combo.Input(
                    "text_encoders", options=list(TEXT_ENCODER_PRESETS), default="none",
                    tooltip="Also train a LoRA on the text encoders: clip (CLIP-L, and CLIP-G for SDXL and SD 3.5) or "
                            "clip+t5 (also T5-XXL, SD 3.5 and Flux). Captions are then encoded at every step.",
                    optional=True,
                ),
            ],
            outputs=[io.Custom("LORA_CONFIG").Output(display_name="lora_config")],
        )

    @classmethod
    def execute(cls, rank, alpha, dropout, targets, include, exclude, algorithm="lora", lokr_factor=-1,
                lokr_full_rank=False, text_encoders="none") -> io.NodeOutput:
        config = LoraConfig(
            rank=rank, alpha=alpha, dropout=dropout, targets=targets,
            include=_patterns(include), exclude=_patterns(exclude),
            algorithm=algorithm, lokr_factor=lokr_factor, lokr_full_rank=lokr_full_rank, text_encoders=text_encoders,
        )
        return io.NodeOutput(config)


def _patterns(text: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in text.split(",") if p.strip())
