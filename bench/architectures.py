"""The benchmarked backbones: ComfyUI's own model classes with the real unet_configs, random weights.

Each full-size config is what `comfy.model_detection.detect_unet_config` returns for the released
checkpoint (SDXL base 1.0, SD3.5 Medium, SD3.5 Large, Flux.1 dev); `build` checks that ComfyUI's
detection maps it to the expected `comfy.supported_models` class. The smoke configs keep each
architecture's structure at a width that trains in seconds on a CPU.
"""

import math
from dataclasses import dataclass

import comfy.model_detection
import comfy.model_management
import comfy.model_patcher
import comfy.supported_models
import torch


@dataclass(frozen=True)
class Architecture:
    key: str
    label: str
    config_class: str  # name in comfy.supported_models
    unet_config: dict
    latent_channels: int
    context: tuple[int, int]  # (tokens, width) of the text conditioning
    pooled: int  # width of the pooled text embedding


@dataclass(frozen=True)
class Variant:
    key: str
    weight_dtype: torch.dtype
    optimizer: str  # this pack's TrainConfig.optimizer; ComfyUI's node always gets AdamW
    batch_size: int


SDXL_BASE = {
    "use_checkpoint": False,
    "image_size": 32,
    "use_spatial_transformer": True,
    "legacy": False,
    "num_classes": "sequential",
    "adm_in_channels": 2816,
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 320,
    "num_res_blocks": [2, 2, 2],
    "transformer_depth": [0, 0, 2, 2, 10, 10],
    "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
    "channel_mult": [1, 2, 4],
    "transformer_depth_middle": 10,
    "use_linear_in_transformer": True,
    "context_dim": 2048,
    "use_temporal_resblock": False,
    "use_temporal_attention": False,
}


def mmdit(depth: int, pos_embed_max_size: int, x_block_self_attn_layers: list[int], context_dim: int, pooled: int):
    """SD3.5's MMDiT as detection reads it: hidden = 64 * depth, RMS QK-norm."""
    return {
        "in_channels": 16,
        "patch_size": 2,
        "out_channels": 16,
        "depth": depth,
        "input_size": None,
        "adm_in_channels": pooled,
        "context_embedder_config": {
            "target": "torch.nn.Linear",
            "params": {"in_features": context_dim, "out_features": 64 * depth},
        },
        "num_patches": pos_embed_max_size**2,
        "pos_embed_max_size": pos_embed_max_size,
        "qk_norm": "rms",
        "pos_embed_scaling_factor": None,
        "x_block_self_attn_layers": x_block_self_attn_layers,
    }


def flux(hidden: int, heads: int, axes_dim: list[int], depth: int, single: int, context_dim: int, pooled: int,
         guidance: bool = True) -> dict:
    """Flux's config as the host's own detection completes it, at the given widths and depths.

    Each ComfyUI version reads keys of its own from it (0.33's Flux requires `txt_ids_dims`), so the config
    comes from `detect_unet_config` on the tensor shapes a file of this model would hold (meta tensors:
    nothing is allocated). Detection derives the heads from the 128-wide RoPE axes of the released model;
    narrow test models set theirs after it.
    """
    shapes = {
        "img_in.weight": (hidden, 64),
        "txt_in.weight": (hidden, context_dim),
        "vector_in.in_layer.weight": (hidden, pooled),
        "double_blocks.0.img_attn.norm.key_norm.scale": (hidden // heads,),
    }
    if guidance:
        shapes["guidance_in.in_layer.weight"] = (hidden, 256)
    shapes |= {f"double_blocks.{i}.img_attn.qkv.weight": (3 * hidden, hidden) for i in range(depth)}
    shapes |= {f"single_blocks.{i}.linear2.weight": (hidden, 5 * hidden) for i in range(single)}
    detected = comfy.model_detection.detect_unet_config({k: torch.empty(v, device="meta") for k, v in shapes.items()},
                                                        "")
    if detected.get("image_model") != "flux":
        raise RuntimeError(f"this ComfyUI does not detect the Flux shapes as Flux: {detected}")
    return detected | {"axes_dim": axes_dim, "num_heads": heads}


# Text conditioning at the real shapes: SDXL CLIP-L+G hidden states (77 × 2048) and pooled CLIP-G (1280, which
# encode_adm widens to 2816); SD3 CLIP-L+G padded to 4096 then T5-XXL (77 + 77 tokens) and pooled L+G (2048);
# Flux T5-XXL at 512 tokens and pooled CLIP-L (768).
FULL = {
    "sdxl": Architecture("sdxl", "SDXL", "SDXL", SDXL_BASE, 4, context=(77, 2048), pooled=1280),
    # Medium: 24 blocks, the first 13 with the extra image self-attention (x_block attn2), a 384² position table.
    "sd35m": Architecture("sd35m", "SD3.5 Medium", "SD3", mmdit(24, 384, list(range(13)), 4096, 2048), 16,
                          context=(154, 4096), pooled=2048),
    "sd35l": Architecture("sd35l", "SD3.5 Large", "SD3", mmdit(38, 192, [], 4096, 2048), 16,
                          context=(154, 4096), pooled=2048),
    "flux": Architecture("flux", "Flux dev", "Flux", flux(3072, 24, [16, 56, 56], 19, 38, 4096, 768), 16,
                         context=(512, 4096), pooled=768),
}

# SDXL's encode_adm appends six 256-wide size embeddings to the pooled vector.
SMOKE_SDXL_POOLED = 32
SMOKE_SDXL = SDXL_BASE | {
    "model_channels": 32,
    "adm_in_channels": SMOKE_SDXL_POOLED + 6 * 256,
    "transformer_depth": [0, 0, 1, 1, 1, 1],
    "transformer_depth_output": [0, 0, 0, 1, 1, 1, 1, 1, 1],
    "transformer_depth_middle": 1,
    "context_dim": 64,
}
SMOKE = {
    "sdxl": Architecture("sdxl", "SDXL", "SDXL", SMOKE_SDXL, 4, context=(8, 64), pooled=SMOKE_SDXL_POOLED),
    "sd35m": Architecture("sd35m", "SD3.5 Medium", "SD3", mmdit(2, 16, [0], 64, 32), 16, context=(8, 64), pooled=32),
    "sd35l": Architecture("sd35l", "SD3.5 Large", "SD3", mmdit(3, 16, [], 64, 32), 16, context=(8, 64), pooled=32),
    "flux": Architecture("flux", "Flux dev", "Flux", flux(128, 2, [8, 28, 28], 1, 2, 64, 32), 16,
                         context=(16, 64), pooled=32),
}

VARIANTS = {
    "bf16": Variant("bf16", torch.bfloat16, "adamw", 1),
    "fp8": Variant("fp8", torch.float8_e4m3fn, "adamw8bit", 1),
    "bs4": Variant("bs4", torch.bfloat16, "adamw", 4),
}

# What the default run covers, in this order: the four models first, then the variants.
PLAN = [
    ("sdxl", "bf16"), ("sd35m", "bf16"), ("sd35l", "bf16"), ("flux", "bf16"),
    ("flux", "fp8"), ("sd35l", "fp8"), ("sdxl", "bs4"), ("flux", "bs4"),
]

COMPUTE_DTYPE = torch.bfloat16


def build(arch: Architecture, weight_dtype: torch.dtype, device: torch.device, check_detection: bool,
          load_device: torch.device | None = None, seed: int = 0):
    """A ModelPatcher around a fresh model built on `device`, every weight random.

    Weights are stored in `weight_dtype` and computed in bf16: fp8 storage uses ComfyUI's
    manual-cast ops, as `load_diffusion_model_state_dict` sets up for `weight_dtype` fp8_e4m3fn
    (ComfyUI would pick fp16 compute for SD3 there; bf16 keeps the runs comparable).
    The patcher loads onto `load_device` (default `device`) and offloads to `device`.
    """
    config_class = getattr(comfy.supported_models, arch.config_class)
    if check_detection:
        detected = comfy.model_detection.model_config_from_unet_config(dict(arch.unet_config))
        if type(detected) is not config_class:
            raise RuntimeError(f"ComfyUI detects {arch.label}'s config as {type(detected).__name__}")
    model_config = config_class(dict(arch.unet_config))
    manual_cast = None if weight_dtype == COMPUTE_DTYPE else COMPUTE_DTYPE
    model_config.set_inference_dtype(weight_dtype, manual_cast)
    model = model_config.get_model({}, device=device)
    randomize_(model.diffusion_model, seed)
    # With load and offload device the same, ComfyUI never moves the weights to the CPU between runs.
    return comfy.model_patcher.ModelPatcher(model, load_device=load_device or device, offload_device=device)


def autoencoder(latent_channels: int) -> torch.nn.Module:
    """The SD/SDXL autoencoder (4 latent channels, quant convs) or SD3's and Flux's (16, none), at full size, as
    ComfyUI's VAE loader rebuilds it from its keys; weights as the classes leave them (randomize_ fills them)."""
    from comfy.ldm.models.autoencoder import AutoencoderKL, AutoencodingEngine

    ddconfig = {"double_z": True, "z_channels": latent_channels, "resolution": 256, "in_channels": 3, "out_ch": 3,
                "ch": 128, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
    if latent_channels == 4:
        return AutoencoderKL(ddconfig=ddconfig, embed_dim=latent_channels)
    return AutoencodingEngine(
        regularizer_config={"target": "comfy.ldm.models.autoencoder.DiagonalGaussianRegularizer"},
        encoder_config={"target": "comfy.ldm.modules.diffusionmodules.model.Encoder", "params": ddconfig},
        decoder_config={"target": "comfy.ldm.modules.diffusionmodules.model.Decoder", "params": ddconfig},
    )


@torch.no_grad()
def randomize_(module: torch.nn.Module, seed: int) -> None:
    """ComfyUI's ops allocate with torch.empty; fill every tensor so activations stay of order one.

    Matrices and kernels get N(0, 1/fan_in), biases zero, norm scales one, MMDiT's position table N(0, 0.02²).
    Values are drawn in bf16 and copied, since fp8 tensors cannot be sampled directly.
    """
    # One generator per device: ComfyUI's text encoders keep some tensors on the CPU beside the GPU ones.
    generators: dict[torch.device, torch.Generator] = {}
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        if not tensor.is_floating_point():
            continue
        if name.endswith("bias"):
            tensor.zero_()
        elif tensor.ndim <= 1:
            tensor.fill_(1.0)
        else:
            std = 0.02 if name == "pos_embed" else 1.0 / math.sqrt(tensor[0].numel())
            generator = generators.setdefault(tensor.device, torch.Generator(device=tensor.device).manual_seed(seed))
            draw = torch.randn(tensor.shape, generator=generator, device=tensor.device, dtype=COMPUTE_DTYPE)
            tensor.copy_(draw * std)


@dataclass
class TextConditioning:
    cond: torch.Tensor  # (1, T, D), as ComfyUI's CLIP encoders return it
    pooled: torch.Tensor  # (1, P)


def random_dataset(arch: Architecture, count: int, resolution: int, seed: int = 0):
    """`count` random latents (N, C, H/8, W/8) and their text conditionings, on the CPU like ComfyUI's."""
    generator = torch.Generator().manual_seed(seed)
    side = resolution // 8
    latents = torch.randn(count, arch.latent_channels, side, side, generator=generator)
    texts = [
        TextConditioning(
            torch.randn(1, *arch.context, generator=generator), torch.randn(1, arch.pooled, generator=generator)
        )
        for _ in range(count)
    ]
    return latents, texts
