"""The `diffusers` layout of a LoRA file: the module names diffusers gives each family's backbone, so
diffusers' `load_lora_weights` / `load_lora_adapter` take the file as it is, and ComfyUI's LoRA Loader
still takes every key (it maps diffusers names for SDXL, SD3 and Flux).

- SD3 and Flux: PEFT keys, `transformer.<diffusers module>.lora_A.weight` / `.lora_B.weight`. diffusers
  has no converter for kohya-named SD3 files, so this is the layout SD3 needs there.
- SDXL: `unet.<diffusers module>.lora.down.weight` / `.lora.up.weight`, attention projections as
  `unet.<...>.attn1.processor.to_q_lora.down.weight`: diffusers' older attention-processor layout, which
  its UNet loader converts to PEFT keys itself. ComfyUI (0.3.75 and 0.33) maps SDXL's diffusers names only
  in that form: plain PEFT names (`...attn1.to_q.lora_A.weight`) would lose every attention layer there.

No `.alpha` keys: both readers then scale by 1, so alpha / rank is folded into the up (B) matrix.
ComfyUI fuses layers that diffusers keeps apart (SD3's and Flux's q/k/v, Flux's single-block linear1 =
q, k, v and the MLP input): each part shares the down matrix and takes its rows of the up matrix. SD3's
last block ends its text stream with a norm whose modulation diffusers orders (scale, shift) where
ComfyUI orders (shift, scale); its up rows are swapped to match.
"""

import re
from dataclasses import dataclass

import torch
from torch import nn

from .families.base import Family
from .lora import LoraNetwork

PREFIXES = {"sdxl": "unet.", "sd3": "transformer.", "flux": "transformer."}


@dataclass(frozen=True)
class Part:
    """A diffusers module that holds `rows` consecutive output rows of a ComfyUI layer."""

    module: str
    rows: int
    swap_halves: bool = False  # (shift, scale) -> (scale, shift)


class NoDiffusersName(ValueError):
    """A layer diffusers has no module for; the message names it."""


# -- SDXL ---------------------------------------------------------------------------------------

SDXL_RESNET = {"in_layers.2": "conv1", "emb_layers.1": "time_emb_proj", "out_layers.3": "conv2",
               "skip_connection": "conv_shortcut"}
SDXL_MIDDLE = {0: "resnets.0", 1: "attentions.0", 2: "resnets.1"}
SDXL_ATTENTION_PROJECTION = re.compile(r"(.*\.attn[12])\.(to_q|to_k|to_v|to_out)(?:\.0)?")


def sdxl_block_positions(num_res_blocks: list[int]) -> tuple[dict[int, tuple[int, int]], ...]:
    """(input block index -> (down block, position), output block index -> (up block, position)). Each
    level has its res blocks and, but for the last, a downsampler; an up block has one res block more.
    diffusers counts up blocks from the deepest level."""
    inputs, outputs = {}, {}
    for level, count in enumerate(num_res_blocks):
        for position in range(count + (level < len(num_res_blocks) - 1)):
            inputs[len(inputs) + 1] = (level, position)
    for level, count in enumerate(reversed(num_res_blocks)):
        for position in range(count + 1):
            outputs[len(outputs)] = (level, position)
    return inputs, outputs


def sdxl_module(path: str, num_res_blocks: list[int]) -> str:
    """`input_blocks.4.1.transformer_blocks.0.attn1.to_q` ->
    `down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q`."""
    if path == "input_blocks.0.0":
        return "conv_in"
    inputs, outputs = sdxl_block_positions(num_res_blocks)
    if match := re.fullmatch(r"input_blocks\.(\d+)\.(\d+)\.(.+)", path):
        index, part, inner = int(match[1]), int(match[2]), match[3]
        if index in inputs:
            level, position = inputs[index]
            if position == num_res_blocks[level] and inner == "op":
                return f"down_blocks.{level}.downsamplers.0.conv"
            return _sdxl_inner(f"down_blocks.{level}", part, position, inner, path)
    elif match := re.fullmatch(r"middle_block\.(\d+)\.(.+)", path):
        if int(match[1]) in SDXL_MIDDLE:
            kind, _, position = SDXL_MIDDLE[int(match[1])].partition(".")
            return _sdxl_inner("mid_block", 0 if kind == "resnets" else 1, int(position), match[2], path)
    elif match := re.fullmatch(r"output_blocks\.(\d+)\.(\d+)\.(.+)", path):
        index, part, inner = int(match[1]), int(match[2]), match[3]
        if index in outputs:
            level, position = outputs[index]
            # The upsampler follows the res block (and attention, where the level has one); an
            # attention module never has a child named `conv`.
            if part > 0 and inner == "conv":
                return f"up_blocks.{level}.upsamplers.0.conv"
            return _sdxl_inner(f"up_blocks.{level}", part, position, inner, path)
    raise NoDiffusersName(f"{path}: no diffusers UNet module corresponds to this layer")


def _sdxl_inner(block: str, part: int, position: int, inner: str, path: str) -> str:
    if part == 0:
        if inner not in SDXL_RESNET:
            raise NoDiffusersName(f"{path}: no diffusers UNet module corresponds to this layer")
        return f"{block}.resnets.{position}.{SDXL_RESNET[inner]}"
    # Inside a transformer (proj_in, transformer_blocks.N.attn1.to_q, ff.net.0.proj, ...) the names agree.
    return f"{block}.attentions.{position}.{inner}"


def sdxl_keys(module: str) -> tuple[str, str]:
    """(down key, up key) of a diffusers UNet module, in the form both diffusers and ComfyUI read."""
    if match := SDXL_ATTENTION_PROJECTION.fullmatch(module):
        stem = f"{PREFIXES['sdxl']}{match[1]}.processor.{match[2]}_lora"
    else:
        stem = f"{PREFIXES['sdxl']}{module}.lora"
    return f"{stem}.down.weight", f"{stem}.up.weight"


# -- SD3 ----------------------------------------------------------------------------------------

SD3_IMAGE = {
    "attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "attn.proj": ("attn.to_out.0",),
    "attn2.qkv": ("attn2.to_q", "attn2.to_k", "attn2.to_v"),
    "attn2.proj": ("attn2.to_out.0",),
    "mlp.fc1": ("ff.net.0.proj",),
    "mlp.fc2": ("ff.net.2",),
    "adaLN_modulation.1": ("norm1.linear",),
}
SD3_TEXT = {
    "attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "attn.proj": ("attn.to_add_out",),
    "mlp.fc1": ("ff_context.net.0.proj",),
    "mlp.fc2": ("ff_context.net.2",),
    "adaLN_modulation.1": ("norm1_context.linear",),
}


def sd3_parts(path: str, out_features: int, blocks: int) -> list[Part]:
    match = re.fullmatch(r"joint_blocks\.(\d+)\.(x_block|context_block)\.(.+)", path)
    table = SD3_IMAGE if match and match[2] == "x_block" else SD3_TEXT
    if not match or match[3] not in table:
        raise NoDiffusersName(f"{path}: no diffusers SD3 module corresponds to this layer")
    index, modules = int(match[1]), table[match[3]]
    # The last block's text stream only modulates its input (pre_only): an AdaLayerNormContinuous in diffusers.
    swap = match[2] == "context_block" and match[3] == "adaLN_modulation.1" and index == blocks - 1
    return [Part(f"transformer_blocks.{index}.{module}", out_features // len(modules), swap) for module in modules]


# -- Flux ---------------------------------------------------------------------------------------

FLUX_DOUBLE = {
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "img_attn.proj": ("attn.to_out.0",),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "txt_attn.proj": ("attn.to_add_out",),
    "img_mlp.0": ("ff.net.0.proj",),
    "img_mlp.2": ("ff.net.2",),
    "txt_mlp.0": ("ff_context.net.0.proj",),
    "txt_mlp.2": ("ff_context.net.2",),
    "img_mod.lin": ("norm1.linear",),
    "txt_mod.lin": ("norm1_context.linear",),
}
FLUX_SINGLE = {"linear2": "proj_out", "modulation.lin": "norm.linear"}


def flux_parts(path: str, out_features: int, hidden_size: int) -> list[Part]:
    if (match := re.fullmatch(r"double_blocks\.(\d+)\.(.+)", path)) and match[2] in FLUX_DOUBLE:
        modules = FLUX_DOUBLE[match[2]]
        return [Part(f"transformer_blocks.{match[1]}.{m}", out_features // len(modules)) for m in modules]
    if match := re.fullmatch(r"single_blocks\.(\d+)\.(.+)", path):
        block = f"single_transformer_blocks.{match[1]}"
        if match[2] == "linear1":  # q, k, v (hidden each), then the MLP's input projection
            qkv = [Part(f"{block}.attn.{m}", hidden_size) for m in ("to_q", "to_k", "to_v")]
            return qkv + [Part(f"{block}.proj_mlp", out_features - 3 * hidden_size)]
        if match[2] in FLUX_SINGLE:
            return [Part(f"{block}.{FLUX_SINGLE[match[2]]}", out_features)]
    raise NoDiffusersName(f"{path}: no diffusers Flux module corresponds to this layer")


# -- the file -----------------------------------------------------------------------------------


def lora_state_dict(network: LoraNetwork, family: Family, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The network in diffusers' layout for `family`, on the CPU, weights in `dtype`."""
    tensors: dict[str, torch.Tensor] = {}
    for path, layer in network.items():
        down = layer.down.detach().to("cpu", torch.float32)
        # Scaled in fp32, then rounded once to the file's dtype.
        up = layer.up.detach().to("cpu", torch.float32) * layer.scale
        parts = parts_of(family.name, path, up.shape[0], family.diffusion_model)
        for key, tensor in layer_tensors(family.name, parts, down, up).items():
            if key in tensors:
                raise ValueError(f"two layers, one of them {path!r}, have the same diffusers key {key!r}")
            tensors[key] = tensor.to(dtype)
    return tensors


def parts_of(family: str, path: str, out_features: int, diffusion_model: nn.Module) -> list[Part]:
    """The diffusers modules a ComfyUI layer (`path` inside diffusion_model) becomes."""
    if family == "sdxl":
        return [Part(sdxl_module(path, list(diffusion_model.num_res_blocks)), out_features)]
    if family == "sd3":
        return sd3_parts(path, out_features, len(diffusion_model.joint_blocks))
    if family == "flux":
        return flux_parts(path, out_features, diffusion_model.hidden_size)
    raise ValueError(f"no diffusers layout for the family {family!r}")


def layer_tensors(family: str, parts: list[Part], down: torch.Tensor, up: torch.Tensor) -> dict[str, torch.Tensor]:
    """A layer's keys: `down` shared by every part, `up` (already scaled by alpha / rank) split by rows."""
    if sum(part.rows for part in parts) != up.shape[0]:
        raise ValueError(f"{[p.module for p in parts]} do not add up to the {up.shape[0]} rows of the layer")
    tensors, start = {}, 0
    for part in parts:
        rows = up[start : start + part.rows]
        start += part.rows
        if part.swap_halves:
            shift, scale = rows.chunk(2)
            rows = torch.cat([scale, shift])
        if family == "sdxl":
            down_key, up_key = sdxl_keys(part.module)
        else:
            stem = PREFIXES[family] + part.module
            down_key, up_key = f"{stem}.lora_A.weight", f"{stem}.lora_B.weight"
        # Copies: safetensors refuses tensors that share memory.
        tensors[down_key] = down.clone().contiguous()
        tensors[up_key] = rows.clone().contiguous()
    return tensors
