"""Diffusion backbones for tests, built with ComfyUI's own model classes and random weights.

Fast set (seconds on a CPU):
- `build_sdxl(prediction)`: a tiny SDXL-shaped UNet, built directly (ComfyUI detects SDXL only at full size).
- `build_sd3()`: a tiny MMDiT written as a checkpoint and loaded back through `comfy.sd.load_checkpoint_guess_config`,
  which detects it as SD3 by itself.
- `build_flux(variant)`: a narrow Flux, built directly (detection fixes 24 heads of 128, i.e. hidden 3072).

Slow set, through ComfyUI's real file loaders:
- `build_flux_full_width(variant)`: hidden 3072, one double and one single block, via `load_diffusion_model`.
- `build_sdxl_full(prediction)`: the full SDXL UNet (2.6 B parameters), via the checkpoint loader.
`flux_full_width_file(variant, context_dim)`: the full-width Flux's file, for tests that hand it to a loader.
`dynamic_vram_stand_in()`: the patcher ComfyUI 0.33's server loaders make on a GPU, made on the CPU
(tests that use it are marked `needs_dynamic_vram`).

Every factory builds once per session and then hands out clones of its cached `ModelPatcher` (same `.model`).
Model files are written in the dtype of the real releases (fp16 SDXL, bf16 Flux) into a temp dir removed at exit.
"""

import atexit
import gc
import logging
import math
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import comfy.model_base
import comfy.model_management
import comfy.model_patcher
import comfy.sd
import comfy.supported_models
import comfy.supported_models_base
import comfy.utils
import pytest
import safetensors
import safetensors.torch
import torch
from comfy.ldm.modules.diffusionmodules.mmdit import get_2d_sincos_pos_embed_torch
from tiny_encoders import text_encoder_dims

from bench.architectures import flux as flux_config

log = logging.getLogger(__name__)

SEED = 0
CHECKPOINT_PREFIX = "model.diffusion_model."

# The tiny models take what tiny_encoders' text encoders give for a prompt, so encoded prompts feed them as is:
# SDXL context 800 (CLIP-L 768 + tiny CLIP-G 32) and pooled 32; SD3 context 4096 (SD3ClipModel pads to it whatever
# the encoders) and pooled 800 (CLIP-L + CLIP-G); Flux context 64 (tiny T5) and vec 768 (CLIP-L pooled).
SDXL_TEXT = text_encoder_dims("sdxl")
SD3_TEXT = text_encoder_dims("sd3")
FLUX_TEXT = text_encoder_dims("flux")
# SDXL's encode_adm appends six 256-wide embeddings (height, width, crop_h, crop_w, target h/w) to the pooled vector.
SDXL_ADM_IN_CHANNELS = SDXL_TEXT.pooled_dim + 6 * 256

# What comfy.model_detection.detect_unet_config reports for a UNet checkpoint, shrunk. Two res blocks per
# level keep SDXL's block indices (input_blocks.4.1 is the first transformer), so LoRA key names match SDXL's.
TINY_SDXL_UNET = {
    "use_checkpoint": False,
    "image_size": 32,
    "use_spatial_transformer": True,
    "legacy": False,
    "num_classes": "sequential",
    "adm_in_channels": SDXL_ADM_IN_CHANNELS,
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 32,
    "num_res_blocks": [2, 2, 2],
    "transformer_depth": [0, 0, 1, 1, 1, 1],
    "transformer_depth_output": [0, 0, 0, 1, 1, 1, 1, 1, 1],
    "channel_mult": [1, 2, 4],
    "transformer_depth_middle": 1,
    "use_linear_in_transformer": True,
    "context_dim": SDXL_TEXT.context_dim,
    "use_temporal_resblock": False,
    "use_temporal_attention": False,
}

FULL_SDXL_UNET = TINY_SDXL_UNET | {
    "adm_in_channels": 2816,
    "model_channels": 320,
    "transformer_depth": [0, 0, 2, 2, 10, 10],
    "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
    "transformer_depth_middle": 10,
    "context_dim": 2048,
}

# Detection derives depth from the width (hidden = 64 * depth, heads = depth): depth 2 is hidden 128, 2 heads.
TINY_SD3_UNET = {
    "in_channels": 16,
    "patch_size": 2,
    "out_channels": 16,
    "depth": 2,
    "input_size": None,
    "adm_in_channels": SD3_TEXT.pooled_dim,
    "context_embedder_config": {
        "target": "torch.nn.Linear",
        "params": {"in_features": SD3_TEXT.context_dim, "out_features": 128},
    },
    # A 32x32 patch grid: latents up to 64x64.
    "num_patches": 32 * 32,
    "pos_embed_max_size": 32,
    "pos_embed_scaling_factor": None,
    "x_block_self_attn_layers": [],
}


def _flux_unet(variant: str, hidden_size: int, num_heads: int, axes_dim: list[int],
               context_dim: int = FLUX_TEXT.context_dim, blocks: tuple[int, int] = (1, 1)) -> dict:
    """`blocks` double and single blocks (one each by default), completed by the host's own detection
    (bench.architectures.flux)."""
    if variant not in ("dev", "schnell"):
        raise ValueError(f"Flux variant must be 'dev' or 'schnell', got {variant!r}")
    return flux_config(hidden_size, num_heads, axes_dim, depth=blocks[0], single=blocks[1], context_dim=context_dim,
                       pooled=FLUX_TEXT.pooled_dim, guidance=variant == "dev")


FLUX_CONFIG_CLASSES = {"dev": comfy.supported_models.Flux, "schnell": comfy.supported_models.FluxSchnell}
# ComfyUI marks v-prediction SDXL checkpoints by the presence of this key.
V_PRED_MARKER = {"v_pred": torch.tensor([])}


def _prediction_marker(prediction: str) -> dict:
    if prediction not in ("eps", "v"):
        raise ValueError(f"SDXL prediction must be 'eps' or 'v', got {prediction!r}")
    return V_PRED_MARKER if prediction == "v" else {}


def initialise_(module: torch.nn.Module, seed: int = SEED) -> None:
    """Fills every parameter and buffer of `module` deterministically, in place.

    ComfyUI's ops allocate weights with `torch.empty` and never initialise them. Matrices and kernels get
    N(0, 1/fan_in), which keeps activations of order one through a few blocks, so outputs are neither zero
    (as with the zero-initialised final layers of a fresh training run) nor overflowing; biases get zeros,
    norm weights/scales ones, MMDiT's `pos_embed` its 2D sin-cos table.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        # NaN first: anything the loops below miss fails assert_initialised instead of passing as garbage.
        for tensor in [*module.parameters(), *module.buffers()]:
            tensor.fill_(math.nan)
        for name, param in module.named_parameters():
            if param.ndim >= 2:
                param.normal_(0.0, 1.0 / math.sqrt(param[0].numel()), generator=generator)
            elif name.endswith("bias"):
                param.zero_()
            else:
                param.fill_(1.0)
        for name, buffer in module.named_buffers():
            if name.rsplit(".", 1)[-1] != "pos_embed":
                raise ValueError(f"no initialiser for buffer {name!r}: teach tiny_models.initialise_ about it")
            _, patches, width = buffer.shape
            grid = math.isqrt(patches)
            buffer.copy_(get_2d_sincos_pos_embed_torch(width, grid, grid).unsqueeze(0))
    assert_initialised(module)


def assert_initialised(module: torch.nn.Module) -> None:
    """Fails naming every floating-point parameter or buffer that holds a NaN or infinity."""
    tensors = [*module.named_parameters(), *module.named_buffers()]
    # NaN and inf propagate through a float32 sum, which is many times faster than isfinite(t).all() on CPU.
    bad = [name for name, t in tensors if t.is_floating_point() and not torch.isfinite(t.sum(dtype=torch.float32))]
    assert not bad, f"non-finite (uninitialised?) tensors: {bad}"


def _patcher(model: comfy.model_base.BaseModel) -> comfy.model_patcher.ModelPatcher:
    """Wraps a model the way comfy.sd.load_diffusion_model_state_dict does."""
    return comfy.model_patcher.ModelPatcher(
        model,
        load_device=comfy.model_management.get_torch_device(),
        offload_device=comfy.model_management.unet_offload_device(),
    )


def _build_direct(
    model_config: comfy.supported_models_base.BASE, marker: dict | None = None
) -> comfy.model_patcher.ModelPatcher:
    """Builds and initialises a model with the dtype ComfyUI's loaders would pick, skipping detection."""
    unet_dtype = comfy.model_management.unet_dtype(supported_dtypes=model_config.supported_inference_dtypes)
    manual_cast = comfy.model_management.unet_manual_cast(
        unet_dtype, comfy.model_management.get_torch_device(), model_config.supported_inference_dtypes
    )
    model_config.set_inference_dtype(unet_dtype, manual_cast)
    model = model_config.get_model(marker or {}).to(comfy.model_management.unet_offload_device())
    initialise_(model.diffusion_model)
    return _patcher(model)


def _write_model_file(
    path: Path, model_config: comfy.supported_models_base.BASE, dtype: torch.dtype, prefix: str
) -> None:
    """Writes randomly initialised weights of `model_config` in ComfyUI's key layout, stored as `dtype`."""
    model_config.set_inference_dtype(dtype, None)
    model = model_config.get_model({})
    initialise_(model.diffusion_model)
    weights = {prefix + k: v for k, v in model.diffusion_model.state_dict().items()}
    safetensors.torch.save_file(weights, str(path))
    log.info("wrote %s (%.1f M parameters)", path.name, sum(v.numel() for v in weights.values()) / 1e6)


def _check_loaded(patcher: comfy.model_patcher.ModelPatcher, path: Path, prefix: str) -> None:
    """ComfyUI loads with strict=False and only logs missing keys; missing ones would stay torch.empty."""
    with safetensors.safe_open(str(path), framework="pt") as f:
        in_file = {k[len(prefix):] for k in f.keys() if k.startswith(prefix)}
    missing = set(patcher.model.diffusion_model.state_dict()) - in_file
    assert not missing, f"{path.name} does not cover {sorted(missing)}"
    assert_initialised(patcher.model)


_work_dir: Path | None = None


def _model_dir() -> Path:
    """The session's folder for model files, created on first use and removed at exit."""
    global _work_dir
    if _work_dir is None:
        _work_dir = Path(tempfile.mkdtemp(prefix="tiny-models-"))
        atexit.register(shutil.rmtree, _work_dir, ignore_errors=True)
    return _work_dir


_files: dict[str, Path] = {}


def _model_file(name: str, write: Callable[[Path], None]) -> Path:
    if name not in _files:
        path = _model_dir() / f"{name}.safetensors"
        write(path)
        _files[name] = path
    return _files[name]


_patchers: dict[str, comfy.model_patcher.ModelPatcher] = {}
# Full-size models take GBs of RAM each (SDXL fp32: 10 GB), so only the latest one stays cached.
_full_size_patchers: dict[str, comfy.model_patcher.ModelPatcher] = {}


def _cached(key: str, build: Callable[[], comfy.model_patcher.ModelPatcher]) -> comfy.model_patcher.ModelPatcher:
    if key not in _patchers:
        _patchers[key] = build()
    return _patchers[key].clone()


def _cached_full_size(
    key: str, build: Callable[[], comfy.model_patcher.ModelPatcher]
) -> comfy.model_patcher.ModelPatcher:
    if key not in _full_size_patchers:
        _full_size_patchers.clear()
        gc.collect()
        _full_size_patchers[key] = build()
    return _full_size_patchers[key].clone()


def build_sdxl(prediction: str = "eps") -> comfy.model_patcher.ModelPatcher:
    """Tiny SDXL UNet (model_channels 32): latent 4 ch, context 800, adm (`y`) 1568 = pooled 32 + 6*256.

    model_type EPS for "eps", V_PREDICTION for "v"; both have the same weights.
    """
    marker = _prediction_marker(prediction)
    return _cached(f"sdxl_{prediction}", lambda: _build_direct(comfy.supported_models.SDXL(TINY_SDXL_UNET), marker))


def build_sd3(x_block_self_attn_layers: tuple[int, ...] = ()) -> comfy.model_patcher.ModelPatcher:
    """Tiny SD3 MMDiT (depth 2, hidden 128, 1.7 M parameters): latent 16 ch, context 4096, pooled (`y`) 800.

    Written as a checkpoint and loaded through comfy.sd.load_checkpoint_guess_config; latents up to 64x64.
    `x_block_self_attn_layers`: the blocks with SD 3.5 Medium's second image attention (`x_block.attn2`).
    """
    name = "sd3_tiny" + "".join(f"_attn2_{i}" for i in x_block_self_attn_layers)
    return _cached(name, lambda: load_sd3(x_block_self_attn_layers))


def load_sd3(x_block_self_attn_layers: tuple[int, ...] = ()) -> comfy.model_patcher.ModelPatcher:
    """The tiny SD3 of `build_sd3` read anew from its file, as a loader node reads it (a model of its own, not
    the shared one: under inference mode its weights are inference tensors, as in ComfyUI)."""
    path = sd3_file(x_block_self_attn_layers)
    patcher = comfy.sd.load_checkpoint_guess_config(str(path), output_vae=False, output_clip=False)[0]
    _check_loaded(patcher, path, CHECKPOINT_PREFIX)
    return patcher


def sd3_file(x_block_self_attn_layers: tuple[int, ...] = ()) -> Path:
    """The checkpoint file of the tiny SD3 (fp32, UNet only), written once per session."""
    config = comfy.supported_models.SD3(TINY_SD3_UNET | {"x_block_self_attn_layers": list(x_block_self_attn_layers)})
    name = "sd3_tiny" + "".join(f"_attn2_{i}" for i in x_block_self_attn_layers)
    return _model_file(name, lambda p: _write_model_file(p, config, torch.float32, CHECKPOINT_PREFIX))


def build_flux(variant: str = "dev", blocks: tuple[int, int] = (1, 1)) -> comfy.model_patcher.ModelPatcher:
    """Narrow Flux (hidden 128, 2 heads, `blocks` double and single blocks, one each by default): latent 16 ch,
    context 64, vec (`y`) 768.

    dev embeds guidance (model_type FLUX), schnell does not (FLOW).
    """
    config = _flux_unet(variant, hidden_size=128, num_heads=2, axes_dim=[8, 28, 28], blocks=blocks)
    name = f"flux_{variant}" + ("" if blocks == (1, 1) else f"_{blocks[0]}x{blocks[1]}")
    return _cached(name, lambda: _build_direct(FLUX_CONFIG_CLASSES[variant](config)))


def flux_full_width_file(variant: str = "dev", context_dim: int = FLUX_TEXT.context_dim) -> Path:
    """The bf16 diffusion-model file of `build_flux_full_width`, written once per session. `context_dim` is the width
    of the text states it takes: the tiny T5's, or CLIP-L's 768 for a Flux fed by ComfyUI's text-encoder loader
    with a CLIP-L file alone (from a T5 file the loader builds the full 4.7 B parameter T5, whatever the file holds).
    """
    unet = _flux_unet(variant, hidden_size=3072, num_heads=24, axes_dim=[16, 56, 56], context_dim=context_dim)
    config = FLUX_CONFIG_CLASSES[variant](unet)
    return _model_file(f"flux_{variant}_full_width_{context_dim}",
                       lambda p: _write_model_file(p, config, torch.bfloat16, ""))


def build_flux_full_width(variant: str = "dev") -> comfy.model_patcher.ModelPatcher:
    """Flux at hidden 3072 (24 heads of 128), 1 double + 1 single block, context 64, vec 768 (0.53 B parameters).

    A bf16 diffusion-model file through comfy.sd.load_diffusion_model, loaded in the dtype ComfyUI picks (fp32 on
    CPU). Only the latest full-size model stays cached.
    """

    def load() -> comfy.model_patcher.ModelPatcher:
        path = flux_full_width_file(variant)
        patcher = comfy.sd.load_diffusion_model(str(path))
        _check_loaded(patcher, path, "")
        return patcher

    return _cached_full_size(f"flux_{variant}_full_width", load)


def build_flux_full_width_direct(variant: str = "dev") -> comfy.model_patcher.ModelPatcher:
    """`build_flux_full_width`'s model built directly, without a file or ComfyUI's loader (seconds, not minutes),
    for tests that need the full width's shapes but not the loading. Only the latest full-size model stays cached."""
    config = _flux_unet(variant, hidden_size=3072, num_heads=24, axes_dim=[16, 56, 56])
    return _cached_full_size(f"flux_{variant}_full_width_direct",
                             lambda: _build_direct(FLUX_CONFIG_CLASSES[variant](config)))


def build_sdxl_full(prediction: str = "eps") -> comfy.model_patcher.ModelPatcher:
    """Full-size SDXL UNet (context 2048, adm 2816) from an fp16 checkpoint through ComfyUI's checkpoint loader.

    Both predictions share one file; "v" adds ComfyUI's `v_pred` marker key to the loaded state dict before
    load_state_dict_guess_config (the function load_checkpoint_guess_config hands the file's contents to).
    """
    marker = _prediction_marker(prediction)

    def load() -> comfy.model_patcher.ModelPatcher:
        config = comfy.supported_models.SDXL(FULL_SDXL_UNET)
        path = _model_file("sdxl_full", lambda p: _write_model_file(p, config, torch.float16, CHECKPOINT_PREFIX))
        if marker:
            state_dict = comfy.utils.load_torch_file(str(path)) | marker
            patcher = comfy.sd.load_state_dict_guess_config(state_dict, output_vae=False, output_clip=False)[0]
        else:
            patcher = comfy.sd.load_checkpoint_guess_config(str(path), output_vae=False, output_clip=False)[0]
        _check_loaded(patcher, path, CHECKPOINT_PREFIX)
        return patcher

    return _cached_full_size(f"sdxl_full_{prediction}", load)


MODEL_FACTORIES: dict[str, Callable[[], comfy.model_patcher.ModelPatcher]] = {
    "sdxl_eps": lambda: build_sdxl("eps"),
    "sdxl_v": lambda: build_sdxl("v"),
    "sd3": build_sd3,
    "flux_dev": lambda: build_flux("dev"),
    "flux_schnell": lambda: build_flux("schnell"),
}


def random_inputs(
    patcher: comfy.model_patcher.ModelPatcher,
    batch: int = 1,
    latent_hw: tuple[int, int] = (16, 16),
    seed: int = 0,
    tokens: int = 8,
) -> dict[str, torch.Tensor]:
    """Seeded random inputs of the shapes `patcher`'s model takes, all float32:

    - `x`: latent (B, C, H, W); C is 4 for SDXL, 16 for SD3 and Flux.
    - `sigma`: (B,) the model's mid-schedule noise level, the `t` argument of `model.apply_model`.
    - `context`: (B, tokens, context_dim), the cross-attention conditioning (`c_crossattn`).
    - `y`: (B, dim): SDXL's adm vector (pooled + size embeddings), SD3's pooled vector, Flux's `vec`.
    - `guidance`: (B,) Flux dev only, the guidance value to embed (1.0).
    """
    model = patcher.model
    unet = model.model_config.unet_config
    if isinstance(model, comfy.model_base.SDXL):
        context_dim, y_dim = unet["context_dim"], unet["adm_in_channels"]
    elif isinstance(model, comfy.model_base.SD3):
        context_dim, y_dim = model.diffusion_model.context_embedder.in_features, unet["adm_in_channels"]
    elif isinstance(model, comfy.model_base.Flux):
        context_dim, y_dim = unet["context_in_dim"], unet["vec_in_dim"]
    else:
        raise TypeError(f"no inputs known for {type(model).__name__}")
    generator = torch.Generator().manual_seed(seed)
    inputs = {
        "x": torch.randn(batch, unet["in_channels"], *latent_hw, generator=generator),
        "sigma": torch.full((batch,), float(model.model_sampling.percent_to_sigma(0.5))),
        "context": torch.randn(batch, tokens, context_dim, generator=generator),
        "y": torch.randn(batch, y_dim, generator=generator),
    }
    if unet.get("guidance_embed"):
        inputs["guidance"] = torch.ones(batch)
    return inputs


def dynamic_vram_stand_in() -> type:
    """ComfyUI 0.33's dynamic-VRAM patcher, which its server's loaders return on NVIDIA cards. For a CPU device
    ComfyUI makes a plain ModelPatcher instead, so here a ModelPatcher that says it is dynamic stands in: ComfyUI's
    own `clone(disable_dynamic=True)` then makes the plain patcher of it (the model loaded again from its file)."""
    return type("DynamicStandIn", (comfy.model_patcher.ModelPatcher,), {"is_dynamic": lambda self: True})


needs_dynamic_vram = pytest.mark.skipif(not hasattr(comfy.model_patcher, "ModelPatcherDynamic"),
                                        reason="this host has no dynamic VRAM loading (ComfyUI 0.3.75)")
