"""The files a user trains from, with random weights, in the release layouts ComfyUI's loaders read; and the
real-run bench's dataset.

Each model is a set of files in ComfyUI's model folders (`checkpoints/`, `diffusion_models/`, `text_encoders/`,
`vae/` under one models folder), named and laid out as the released files are:
- SDXL: one checkpoint, `sd_xl_base_1.0.safetensors` (fp16): `model.diffusion_model.*`, CLIP-L under
  `conditioner.embedders.0.transformer.*`, CLIP-G in open_clip's layout under `conditioner.embedders.1.model.*`,
  the VAE under `first_stage_model.*`, written by ComfyUI's own `state_dict_for_saving` (what its Save
  Checkpoint node writes, and what `load_checkpoint_guess_config` reads);
- SD 3.5 Medium / Large: `sd3.5_medium.safetensors` / `sd3.5_large.safetensors` (bf16, `model.diffusion_model.*`),
  `clip_l.safetensors`, `clip_g.safetensors`, `t5xxl_fp16.safetensors` (transformers' key names), and the 16-channel
  VAE;
- Flux dev: `flux1-dev.safetensors` (bf16, BFL's key names, no prefix), `clip_l`, `t5xxl_fp16`, `ae.safetensors`.
With fp8 weights the diffusion model is written in float8_e4m3fn (a file of half the size, as the fp8 files people
download) and loaded with the loader's weight_dtype fp8_e4m3fn.

Every tensor is random (N(0, 1/fan_in) matrices, zero biases, unit norm scales: bench/architectures.py's
`randomize_`), drawn on the GPU where there is one. `--tiny` sets stand for a model ComfyUI still detects and loads
through the same loaders: a small SD3 (detected by shape) with the real-size CLIP-L and VAE, and no CLIP-G / T5
(ComfyUI's loaders build those at full size whatever the file holds; its SD3 text encoder pads the missing
CLIP-G's pooled half with zeros).
"""

import inspect
import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

GIB = 1024**3
MODELS = ("sdxl", "sd35m", "sd35l", "flux")
LABELS = {"sdxl": "SDXL", "sd35m": "SD3.5 Medium", "sd35l": "SD3.5 Large", "flux": "Flux dev", "tiny": "SD3 (tiny)"}
WEIGHTS = ("default", "fp8")
# The loader's weight_dtype (Load Base Model's input; `model.quantize` in the YAML) for each choice.
LOADER_DTYPE = {"default": "default", "fp8": "fp8_e4m3fn"}
MODEL_FOLDERS = ("checkpoints", "diffusion_models", "text_encoders", "vae")
TINY_SD3_DEPTH = 2  # hidden 128: ComfyUI detects MMDiT depth from the width
TINY_SD3_POSITIONS = 32  # a 32x32 patch table: latents up to 64x64, images up to 512 px


@dataclass(frozen=True)
class ModelFiles:
    """The files of one model, as paths relative to the models folder (`<folder>/<name>`)."""

    model: str
    weights: str
    checkpoint: str = ""
    diffusion_model: str = ""
    text_encoders: tuple[str, ...] = ()
    vae: str = ""

    @property
    def all(self) -> list[str]:
        return [f for f in (self.checkpoint, self.diffusion_model, *self.text_encoders, self.vae) if f]


def model_files(model: str, weights: str, tiny: bool = False) -> ModelFiles:
    if tiny:
        return ModelFiles("tiny", weights, diffusion_model="diffusion_models/tiny_sd3.safetensors",
                          text_encoders=("text_encoders/clip_l.safetensors",), vae="vae/sd3_vae.safetensors")
    if model == "sdxl":
        return ModelFiles(model, weights, checkpoint="checkpoints/sd_xl_base_1.0.safetensors")
    suffix = "_fp8_e4m3fn" if weights == "fp8" else ""
    if model in ("sd35m", "sd35l"):
        size = "medium" if model == "sd35m" else "large"
        return ModelFiles(model, weights, diffusion_model=f"diffusion_models/sd3.5_{size}{suffix}.safetensors",
                          text_encoders=("text_encoders/clip_l.safetensors", "text_encoders/clip_g.safetensors",
                                         "text_encoders/t5xxl_fp16.safetensors"),
                          vae="vae/sd3_vae.safetensors")
    if model == "flux":
        return ModelFiles(model, weights, diffusion_model=f"diffusion_models/flux1-dev{suffix}.safetensors",
                          text_encoders=("text_encoders/clip_l.safetensors", "text_encoders/t5xxl_fp16.safetensors"),
                          vae="vae/ae.safetensors")
    raise ValueError(f"unknown model {model!r}; expected one of {', '.join(MODELS)}")


def stale_files(models_dir: Path, keep: ModelFiles) -> list[Path]:
    """Model files in the folder that `keep` does not use (other models, other weight dtypes)."""
    wanted = {models_dir / f for f in keep.all}
    # Also what an interrupted write left (`.partial`).
    found = [p for folder in MODEL_FOLDERS for p in sorted((models_dir / folder).glob("*.safetensors*"))]
    return [p for p in found if p not in wanted]


# -- writing the files (on the GPU where there is one; imports ComfyUI) ---------------------------------------


def write_missing(models_dir: Path, files: ModelFiles, device) -> list[str]:
    """Writes each file of `files` that is not in `models_dir` yet; returns the ones written. A file is
    written under a temporary name and renamed, so an interrupted run leaves no partial file."""
    written = []
    for relative in files.all:
        path = models_dir / relative
        if path.is_file():
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = _tensors_of(relative, files, device)
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        free = _free_bytes(path.parent)
        if size > free:
            raise OSError(f"{relative} needs {size / GIB:.1f} GiB and {path.parent} has {free / GIB:.1f} GiB free: "
                          "remove other models' files (--clean-other-models) or choose another --models folder")
        _save(tensors, path)
        written.append(relative)
        del tensors
        _release(device)
        log.info("wrote %s (%.2f GiB)", relative, size / GIB)
    return written


def _free_bytes(folder: Path) -> int:
    stats = os.statvfs(folder)
    return stats.f_bavail * stats.f_frsize


def _save(tensors: dict, path: Path) -> None:
    import safetensors.torch

    partial = path.with_name(path.name + ".partial")
    safetensors.torch.save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(partial))
    os.replace(partial, path)


def _release(device) -> None:
    import gc

    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _tensors_of(relative: str, files: ModelFiles, device) -> dict:
    """The state dict of one file, in its release layout, on `device`."""
    name = Path(relative).name
    if relative == files.checkpoint:
        return _sdxl_checkpoint(device)
    if relative == files.diffusion_model:
        return _diffusion_model(files, device)
    if name == "clip_l.safetensors":
        import comfy.sd1_clip

        return _encoder(comfy.sd1_clip.SDClipModel, device)
    if name == "clip_g.safetensors":
        import comfy.sdxl_clip

        return _encoder(comfy.sdxl_clip.SDXLClipG, device)
    if name.startswith("t5xxl"):
        import comfy.text_encoders.sd3_clip

        return _encoder(comfy.text_encoders.sd3_clip.T5XXLModel, device)
    if relative == files.vae:
        return _vae(16, device).state_dict()
    raise ValueError(f"no writer for {relative}")


def _dtype(name: str):
    import torch

    return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp8": torch.float8_e4m3fn}[name]


def _architecture(model: str):
    import architectures

    if model == "tiny":
        # Context 4096 (ComfyUI's SD3 encoder pads to it) and pooled 768 + 1280 (CLIP-L's, then zeros for CLIP-G).
        unet = architectures.mmdit(TINY_SD3_DEPTH, TINY_SD3_POSITIONS, [], 4096, 2048)
        return architectures.Architecture("tiny", "SD3 (tiny)", "SD3", unet, 16, context=(154, 4096), pooled=2048)
    return architectures.FULL[model]


def _diffusion_model(files: ModelFiles, device) -> dict:
    import architectures

    release_dtype = "bf16" if files.model != "tiny" else "fp16"
    dtype = _dtype("fp8" if files.weights == "fp8" else release_dtype)
    patcher = architectures.build(_architecture(files.model), dtype, device, check_detection=True)
    # SD3.5's files hold the MMDiT under the checkpoint prefix; Flux's (BFL's layout) under none.
    prefix = "" if files.model == "flux" else "model.diffusion_model."
    return {prefix + k: v for k, v in patcher.model.diffusion_model.state_dict().items()}


def _sdxl_checkpoint(device) -> dict:
    """SDXL's UNet, CLIP-L + CLIP-G and VAE in one file, in the layout ComfyUI's Save Checkpoint writes."""
    import architectures
    import comfy.sdxl_clip

    fp16 = _dtype("fp16")
    patcher = architectures.build(architectures.FULL["sdxl"], fp16, device, check_detection=True)
    clip = comfy.sdxl_clip.SDXLClipModel(device=device, dtype=fp16)
    architectures.randomize_(clip, seed=1)
    vae = _vae(4, device)
    return checkpoint_state_dict(patcher.model, clip.state_dict(), vae.state_dict())


def checkpoint_state_dict(model, clip_state_dict: dict, vae_state_dict: dict) -> dict:
    """The single-file layout of `model` with its encoders and VAE, through the host's `state_dict_for_saving`:
    ComfyUI 0.3.75 takes the UNet from the model, newer hosts (0.33) take it as a first argument."""
    extra = {}
    if "unet_state_dict" in inspect.signature(model.state_dict_for_saving).parameters:
        extra["unet_state_dict"] = model.diffusion_model.state_dict()
    return model.state_dict_for_saving(clip_state_dict=clip_state_dict, vae_state_dict=vae_state_dict, **extra)


def _encoder(encoder_class, device) -> dict:
    """A text encoder's transformer, as the released clip_l / clip_g / t5xxl_fp16 files hold it (fp16)."""
    import architectures

    encoder = encoder_class(device=device, dtype=_dtype("fp16"))
    architectures.randomize_(encoder.transformer, seed=2)
    return encoder.transformer.state_dict()


def _vae(latent_channels: int, device):
    """The autoencoder of that latent width at full size, as ComfyUI's VAE loader rebuilds it from these keys."""
    import architectures

    vae = architectures.autoencoder(latent_channels).to(device)
    architectures.randomize_(vae, seed=3)
    return vae


# -- the dataset -------------------------------------------------------------------------------------------

# (width, height) of the images, one aspect-ratio bucket each at 1024² (the trainer's buckets: sides multiples of
# 64, area at most resolution²), and how many images each gets.
BUCKETS_1024 = (((1024, 1024), 4), ((832, 1216), 3), ((1216, 832), 3))
BUCKETS_TINY = (((128, 128), 3), ((64, 192), 3), ((192, 64), 3))
SUBJECTS = ("a red fox", "a lighthouse", "a bowl of lemons", "a mountain lake", "an old bicycle", "a tabby cat",
            "a wooden boat", "a city street at night", "a bunch of tulips", "a steam locomotive")


def write_dataset(folder: Path, tiny: bool, trigger: str, square: bool = False) -> dict:
    """JPEG images (smooth colour fields with a few shapes, seeded) with same-name .txt captions, in three
    aspect-ratio buckets, or with `square` as many in the square bucket alone; written once (a folder that
    already holds them is kept). Returns what it holds."""
    from PIL import Image, ImageDraw, ImageFilter

    buckets = BUCKETS_TINY if tiny else BUCKETS_1024
    if square:
        buckets = ((buckets[0][0], sum(count for _, count in buckets)),)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    index = 0
    for (width, height), count in buckets:
        for _ in range(count):
            stem = folder / f"{index:02d}_{width}x{height}"
            index += 1
            if stem.with_suffix(".jpg").is_file() and stem.with_suffix(".txt").is_file():
                continue
            image = Image.new("RGB", (width, height), tuple(rng.randrange(256) for _ in range(3)))
            draw = ImageDraw.Draw(image)
            for _ in range(6):
                x, y = rng.randrange(width), rng.randrange(height)
                radius = rng.randrange(min(width, height) // 8, min(width, height) // 2)
                draw.ellipse((x - radius, y - radius, x + radius, y + radius),
                             fill=tuple(rng.randrange(256) for _ in range(3)))
            image = image.filter(ImageFilter.GaussianBlur(radius=max(2, width // 64)))
            image.save(stem.with_suffix(".jpg"), quality=92)
            subject = SUBJECTS[(index - 1) % len(SUBJECTS)]
            stem.with_suffix(".txt").write_text(f"{trigger}, a photo of {subject}, soft light, detailed")
    return {"folder": str(folder), "images": index, "buckets": [list(size) for size, _ in buckets],
            "resolution": 128 if tiny else 1024}
