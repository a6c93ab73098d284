import folder_paths
import torch
from comfy_api.latest import io

from ..trainer_core import loading
from .lora_config import CATEGORY

NONE = "(none)"
WEIGHT_DTYPES = {"default": None, "fp8_e4m3fn": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
# Text encoders each family's diffusion model needs, in ComfyUI's loader order.
TEXT_ENCODERS = {"sdxl": "clip_l + clip_g", "sd3": "clip_l + clip_g + t5xxl", "flux": "clip_l + t5xxl"}


def _choices(folder: str) -> list[str]:
    return [NONE, *folder_paths.get_filename_list(folder)]


class LoadBaseModelNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LoraTrainer_LoadBaseModel",
            display_name="Load Base Model",
            category=CATEGORY,
            description="Loads the model to train on through ComfyUI's loaders: a single checkpoint, or a diffusion "
                        "model with its text encoders and VAE. The family (SDXL, SD 3.5, Flux) is detected.",
            inputs=[
                io.Combo.Input("checkpoint", options=_choices("checkpoints"),
                               tooltip="A checkpoint holding model, text encoders and VAE; or (none)."),
                io.Combo.Input("diffusion_model", options=_choices("diffusion_models"),
                               tooltip="Used when no checkpoint is chosen."),
                io.Combo.Input("weight_dtype", options=list(WEIGHT_DTYPES), default="default",
                               tooltip="Storage of the diffusion model's weights. default: bf16 on cards that compute "
                                       "in bf16 (as training does) unless the file is fp8, else ComfyUI's choice; "
                                       "fp8 halves their memory."),
                io.Combo.Input("text_encoder_1", options=_choices("text_encoders"), tooltip="clip_l."),
                io.Combo.Input("text_encoder_2", options=_choices("text_encoders"),
                               tooltip="clip_g (SDXL, SD 3.5) or t5xxl (Flux)."),
                io.Combo.Input("text_encoder_3", options=_choices("text_encoders"), tooltip="t5xxl (SD 3.5)."),
                io.Combo.Input("vae", options=_choices("vae"),
                               tooltip="Overrides the checkpoint's VAE; needed with a diffusion model."),
            ],
            outputs=[io.Model.Output(), io.Clip.Output(), io.Vae.Output(),
                     io.String.Output(display_name="family", tooltip="sdxl, sd3 or flux.")],
        )

    @classmethod
    def validate_inputs(cls, checkpoint, diffusion_model, vae, **_):
        if checkpoint == NONE and diffusion_model == NONE:
            return "choose a checkpoint, or a diffusion model with its text encoders and VAE"
        if checkpoint == NONE and vae == NONE:
            return "a diffusion model needs a VAE: choose one in 'vae'"
        return True

    @classmethod
    def execute(cls, checkpoint, diffusion_model, weight_dtype, text_encoder_1, text_encoder_2, text_encoder_3,
                vae) -> io.NodeOutput:
        embeddings = folder_paths.get_folder_paths("embeddings")
        if checkpoint != NONE:
            path = folder_paths.get_full_path_or_raise("checkpoints", checkpoint)
        else:
            path = folder_paths.get_full_path_or_raise("diffusion_models", diffusion_model)
        model, clip, loaded_vae, family = loading.load_diffusion_model(
            path, checkpoint != NONE, WEIGHT_DTYPES[weight_dtype], embeddings)
        encoders = [e for e in (text_encoder_1, text_encoder_2, text_encoder_3) if e != NONE]
        if encoders:
            paths = [folder_paths.get_full_path_or_raise("text_encoders", e) for e in encoders]
            clip = loading.load_text_encoders(paths, family, embeddings)
        if clip is None:
            raise ValueError(f"this {family} model needs text encoders ({TEXT_ENCODERS[family]}): choose them")
        if vae != NONE:
            loaded_vae = loading.load_vae(folder_paths.get_full_path_or_raise("vae", vae))
        return io.NodeOutput(model, clip, loaded_vae, family)
