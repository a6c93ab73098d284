"""Deterministic VAEs and text encoders for tests, built once per session and loaded through ComfyUI.

Every component is randomly initialised from its own fixed seed, saved as safetensors in the key layout
and dtype of the real release files (into a temp dir removed at exit) and loaded back with ComfyUI's
own code, so tests get the objects ComfyUI's loader nodes would hand to our nodes:

- VAEs are real size (~84M parameters): SDXL's with 4 latent channels (quant convs, so ComfyUI builds an
  `AutoencoderKL`), SD3's and Flux's with 16 (no quant convs, so an `AutoencodingEngine`). The file is
  read with `comfy.utils.load_torch_file` and becomes `comfy.sd.VAE(sd=...)`, as in `VAELoader`.
- Text encoders come back as a real `comfy.sd.CLIP` with ComfyUI's model classes and real tokenizers.
  CLIP-L is real size. CLIP-G and T5-XXL are ComfyUI's `SDXLClipG` and `T5XXLModel` made small through
  ComfyUI's per-encoder config override, `model_options["clip_g_model_config"]` / `["t5xxl_model_config"]`.
  Flux (CLIP-L + T5) goes through `comfy.sd.load_clip`, as `DualCLIPLoader` does. SDXL and SD3 cannot:
  `load_clip` overwrites `clip_g_model_config` with its long-CLIP override (`comfy/text_encoders/
  long_clipl.py`), so it would build CLIP-G at full width. For them we take `load_clip`'s steps without
  that override: the same model and tokenizer classes, `comfy.sd.CLIP(...)`, then `CLIP.load_sd` per
  file, which routes each file to its encoder by key. ComfyUI's loader nodes cannot pass `model_options`,
  so a live server cannot load the small CLIP-G / T5 files.

What the host fixes about the conditioning (see `text_encoder_dims`):
- CLIP-G keeps its 32 layers: ComfyUI tells CLIP-G from CLIP-L by the key of layer 30.
- SD3's context is 4096 wide whatever the encoders: `SD3ClipModel` pads CLIP-L+G to 4096 and appends the
  T5 tokens, so SD3's T5 must be 4096 wide.
"""

import atexit
import logging
import shutil
import tempfile
import time
import zlib
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import comfy.sd
import comfy.sd1_clip
import comfy.sdxl_clip
import comfy.text_encoders.sd3_clip
import comfy.utils
import safetensors.torch
import torch
from comfy.supported_models_base import ClipTarget

from bench.architectures import autoencoder

log = logging.getLogger(__name__)

FAMILIES = ("sdxl", "sd3", "flux")
LATENT_CHANNELS = {"sdxl": 4, "sd3": 16, "flux": 16}
CLIP_L_WIDTH = 768
SD3_T5_WIDTH = 4096
DEFAULT_CLIP_G_WIDTH = 32
DEFAULT_FLUX_T5_WIDTH = 64
# A short prompt gives 77 tokens per CLIP; ComfyUI pads T5 to 77 tokens for SD3 and to 256 for Flux.
CLIP_TOKENS = 77
T5_MIN_TOKENS = {"sd3": 77, "flux": 256}
ENCODERS = {"sdxl": ("clip_l", "clip_g"), "sd3": ("clip_l", "clip_g", "t5xxl"), "flux": ("clip_l", "t5xxl")}


@dataclass(frozen=True)
class TextEncoderDims:
    """What `CLIPTextEncode` gives for a short prompt: cond (1, tokens, context_dim), pooled (1, pooled_dim)."""

    context_dim: int
    tokens: int
    pooled_dim: int


def text_encoder_dims(
    family: str, clip_g_width: int = DEFAULT_CLIP_G_WIDTH, t5_width: int | None = None
) -> TextEncoderDims:
    t5_width = _t5_width(family, t5_width)
    if family == "sdxl":
        # CLIP-L's and CLIP-G's penultimate states side by side; pooled is CLIP-G's projection.
        return TextEncoderDims(CLIP_L_WIDTH + clip_g_width, CLIP_TOKENS, clip_g_width)
    if family == "sd3":
        # CLIP tokens padded to 4096 wide, then the T5 tokens; pooled is CLIP-L's and CLIP-G's side by side.
        return TextEncoderDims(SD3_T5_WIDTH, CLIP_TOKENS + T5_MIN_TOKENS["sd3"], CLIP_L_WIDTH + clip_g_width)
    # T5's states; pooled is CLIP-L's (unprojected).
    return TextEncoderDims(t5_width, T5_MIN_TOKENS["flux"], CLIP_L_WIDTH)


def vae_file(latent_channels: int) -> Path:
    """A VAE file in the layout of SDXL's (4 latent channels) or of SD3's and Flux's (16)."""
    return _vae_file(latent_channels)


def build_vae(latent_channels: int) -> comfy.sd.VAE:
    """The VAE of `vae_file`, loaded as `VAELoader` loads it. Shared by the session: do not mutate it."""
    return _build_vae(latent_channels)


def clip_files(family: str, clip_g_width: int = DEFAULT_CLIP_G_WIDTH, t5_width: int | None = None) -> list[Path]:
    """A family's text-encoder files, in the order of ComfyUI's dual / triple CLIP loader inputs."""
    widths = {"clip_l": CLIP_L_WIDTH, "clip_g": clip_g_width, "t5xxl": _t5_width(family, t5_width)}
    return [_encoder_file(name, widths[name]) for name in ENCODERS[family]]


def clip_model_options(family: str, clip_g_width: int = DEFAULT_CLIP_G_WIDTH, t5_width: int | None = None) -> dict:
    """The `model_options` under which ComfyUI builds CLIP-G and T5 at the size of `clip_files`."""
    return {
        "clip_g_model_config": _clip_g_config(clip_g_width),
        "t5xxl_model_config": _t5_config(_t5_width(family, t5_width)),
    }


def build_clip(family: str, clip_g_width: int = DEFAULT_CLIP_G_WIDTH, t5_width: int | None = None) -> comfy.sd.CLIP:
    """A family's text encoders as one `comfy.sd.CLIP`. Shared by the session: patch only a `clip.clone()`."""
    return _build_clip(family, clip_g_width, _t5_width(family, t5_width))


def build_fp32_clip(family: str) -> comfy.sd.CLIP:
    """A fresh CLIP of `build_clip`'s files, every weight in fp32: ComfyUI merges a LoRA into the weights in their
    own dtype, so comparisons at fp32 precision need fp32 weights. Not shared: a test may change it."""
    clip = _build_clip.__wrapped__(family, DEFAULT_CLIP_G_WIDTH, _t5_width(family, None))
    clip.cond_stage_model.float()
    return clip


def randomize_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Fill every parameter and buffer: ComfyUI's ops leave them `torch.empty` when built without weights."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
            if tensor.ndim >= 2:
                tensor.normal_(0.0, tensor[0].numel() ** -0.5, generator=generator)  # variance-preserving
            elif name.endswith("bias"):
                tensor.zero_()
            elif tensor.ndim == 1 and name.endswith("weight"):  # the scale of a norm layer
                tensor.fill_(1.0)
            else:
                raise ValueError(f"no initialisation rule for {name} {tuple(tensor.shape)}")
    return module


def _t5_width(family: str, t5_width: int | None) -> int:
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    if family != "sd3":
        return DEFAULT_FLUX_T5_WIDTH if t5_width is None else t5_width
    if t5_width not in (None, SD3_T5_WIDTH):
        raise ValueError(f"SD3's T5 must be {SD3_T5_WIDTH} wide: ComfyUI's SD3ClipModel pads CLIP-L+G to that width")
    return SD3_T5_WIDTH


def _clip_g_config(width: int) -> dict:
    return {"hidden_size": width, "intermediate_size": 4 * width, "num_attention_heads": 2, "projection_dim": width}


def _t5_config(width: int) -> dict:
    return {"d_model": width, "d_ff": 64, "d_kv": 16, "num_heads": 2, "num_layers": 2}


@cache
def _cache_dir() -> Path:
    path = Path(tempfile.mkdtemp(prefix="tiny-encoders-"))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def _seed(name: str) -> int:
    # Stable across processes (unlike hash()) and independent of the order components are built in.
    return zlib.crc32(name.encode())


def _save(module: torch.nn.Module, name: str) -> Path:
    path = _cache_dir() / f"{name}.safetensors"
    safetensors.torch.save_file(module.state_dict(), path)
    return path


@cache
def _vae_file(latent_channels: int) -> Path:
    if latent_channels not in (4, 16):
        raise ValueError(f"latent_channels must be 4 (SDXL) or 16 (SD3, Flux), not {latent_channels}")
    started = time.perf_counter()
    model = autoencoder(latent_channels)  # bench/architectures.py: the layout ComfyUI's VAE loader reads
    randomize_(model, _seed(f"vae-{latent_channels}"))  # fp32, as sdxl_vae.safetensors
    path = _save(model, f"vae_{latent_channels}ch")
    log.info("wrote %s in %.1f s", path.name, time.perf_counter() - started)
    return path


@cache
def _build_vae(latent_channels: int) -> comfy.sd.VAE:
    vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(str(vae_file(latent_channels))))
    vae.throw_exception_if_invalid()
    return vae


@cache
def _encoder_file(name: str, width: int) -> Path:
    started = time.perf_counter()
    # fp16 and only the transformer, as the released clip_l / clip_g / t5xxl_fp16 files.
    if name == "clip_l":
        encoder = comfy.sd1_clip.SDClipModel(dtype=torch.float16)
    elif name == "clip_g":
        options = {"clip_g_model_config": _clip_g_config(width)}
        encoder = comfy.sdxl_clip.SDXLClipG(dtype=torch.float16, model_options=options)
    else:
        options = {"t5xxl_model_config": _t5_config(width)}
        encoder = comfy.text_encoders.sd3_clip.T5XXLModel(dtype=torch.float16, model_options=options)
    randomize_(encoder.transformer, _seed(f"{name}-{width}"))
    path = _save(encoder.transformer, f"{name}_{width}")
    log.info("wrote %s in %.1f s", path.name, time.perf_counter() - started)
    return path


@cache
def _build_clip(family: str, clip_g_width: int, t5_width: int) -> comfy.sd.CLIP:
    paths = clip_files(family, clip_g_width, t5_width)
    options = clip_model_options(family, clip_g_width, t5_width)
    if family == "flux":
        return comfy.sd.load_clip([str(p) for p in paths], clip_type=comfy.sd.CLIPType.FLUX, model_options=options)

    # comfy.sd.load_text_encoder_state_dicts for two (SDXL) or three (SD3) files, minus the long-CLIP override.
    state_dicts = [comfy.utils.load_torch_file(str(p), safe_load=True) for p in paths]
    if family == "sdxl":
        target = ClipTarget(comfy.sdxl_clip.SDXLTokenizer, comfy.sdxl_clip.SDXLClipModel)
    else:
        sd3 = comfy.text_encoders.sd3_clip
        target = ClipTarget(sd3.SD3Tokenizer, sd3.sd3_clip(**comfy.sd.t5xxl_detect(state_dicts)))
    parameters = sum(comfy.utils.calculate_parameters(sd) for sd in state_dicts)
    clip = comfy.sd.CLIP(target, parameters=parameters, model_options=options)
    for path, state_dict in zip(paths, state_dicts, strict=True):
        missing, _ = clip.load_sd(state_dict)
        if missing:
            raise RuntimeError(f"{path.name} left {len(missing)} text-encoder weights unset, e.g. {missing[:3]}")
    return clip
