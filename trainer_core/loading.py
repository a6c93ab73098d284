"""The base model through ComfyUI's own loaders, for the Load Base Model node and the command line."""

import comfy.model_management
import comfy.sd
import comfy.utils
import safetensors
import torch

from . import comfy_compat
from .config import TrainConfig
from .families import family_for

# ComfyUI's text-encoder loader type for each family's encoders (clip_l + clip_g, + t5xxl, clip_l + t5xxl).
CLIP_TYPES = {
    "sdxl": comfy.sd.CLIPType.STABLE_DIFFUSION,
    "sd3": comfy.sd.CLIPType.SD3,
    "flux": comfy.sd.CLIPType.FLUX,
}


def storage_dtype(path: str, weight_dtype: torch.dtype | None) -> torch.dtype | None:
    """How the diffusion model's weights in `path` are stored: `weight_dtype` where one is asked for (fp8); else
    bf16 where the card computes in bf16 and the file holds 16- or 32-bit weights; else None (ComfyUI's choice,
    which keeps an fp8 file's weights in fp8 where the card computes in fp8 or lacks the memory for 16 bits).
    ComfyUI runs SDXL and SD3 in fp16 where it can, and a run trains under bf16 autocast (TrainConfig.precision),
    which would then cast every fp16 weight to bf16 at each use, in the forward, each checkpoint's recompute and
    the backward: kernels and transient memory that weights stored in bf16 do not need. Matmuls and
    convolutions see the same bf16 values either way."""
    if weight_dtype is not None:
        return weight_dtype
    stored = _stored_dtypes(path)
    if not stored or stored & {"F8_E4M3", "F8_E5M2"}:
        return None
    return torch.bfloat16 if comfy.model_management.should_use_bf16(comfy.model_management.get_torch_device()) else None


def _is_safetensors(path: str) -> bool:
    return path.lower().endswith((".safetensors", ".sft"))  # the names ComfyUI's loaders read as safetensors


def _stored_dtypes(path: str) -> set[str]:
    """The dtypes of a safetensors file's tensors, from its header alone; empty for other files (a pickled
    checkpoint says nothing without being loaded) and for a header that cannot be read (ComfyUI's loader then
    says what is wrong with the file, as before)."""
    if not _is_safetensors(path):
        return set()
    try:
        with safetensors.safe_open(path, framework="pt") as file:
            return {file.get_slice(key).get_dtype() for key in file.keys()}
    except (OSError, safetensors.SafetensorError):
        return set()


def load_diffusion_model(path: str, is_checkpoint: bool, weight_dtype: torch.dtype | None, embeddings=None):
    """(MODEL, CLIP or None, VAE or None, family name) of a checkpoint, or of a diffusion-model file
    (then CLIP and VAE are None). `weight_dtype` (e.g. fp8) is how the diffusion model's weights are stored;
    None stores them as `storage_dtype` says."""
    dtype = storage_dtype(path, weight_dtype)
    options = {"dtype": dtype} if dtype is not None else {}
    clip = vae = None
    if is_checkpoint:
        loader = comfy.sd.load_checkpoint_guess_config
        model, clip, vae = loader(path, embedding_directory=embeddings, model_options=options,
                                  **comfy_compat.plain_loader_options(loader))[:3]
    else:
        loader = comfy.sd.load_diffusion_model
        model = loader(path, model_options=options, **comfy_compat.plain_loader_options(loader))
    # Here as well as where a run takes its model (comfy_compat.plain_patcher): Load Base Model's MODEL and CLIP
    # also go to ComfyUI's own nodes (LoRA Loader, KSampler), which run a plain model's weights as stored.
    comfy_compat.store_in_declared_dtypes(model.model)
    if clip is not None:
        comfy_compat.store_in_declared_dtypes(clip.patcher.model)
    return model, clip, vae, family_for(model.model, TrainConfig()).name


def load_text_encoders(paths: list[str], family: str, embeddings=None):
    loader = comfy.sd.load_clip
    clip = loader(paths, embedding_directory=embeddings, clip_type=CLIP_TYPES[family],
                  **comfy_compat.plain_loader_options(loader))
    comfy_compat.store_in_declared_dtypes(clip.patcher.model)
    return clip


def load_vae(path: str):
    return comfy.sd.VAE(sd=comfy.utils.load_torch_file(path))


def check_weights_file(path: str) -> None:
    """Raises if `path` is a safetensors file whose header cannot be read; reads only the header,
    so each file of a list can be told apart before the loader takes them all at once."""
    if _is_safetensors(path):
        with safetensors.safe_open(path, framework="pt"):
            pass
