"""Activation-space LoRA on the torch modules of a ComfyUI model.

y = W·x + (alpha / rank) · B(A(dropout(x))) is added by a forward hook, so the base layer
(ComfyUI's cast ops included, fp8-stored weights too) runs exactly as it does without the
LoRA and no W + BA is materialised per step. ComfyUI's patcher clones share their torch
modules, so hooks live only for the duration of a run: `LoraNetwork.attached` installs them
and removes every one on exit, also on error.
"""

import contextlib
import math
import re
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .config import LoraConfig


class LoraLayer(nn.Module):
    """The trainable pair for one base layer: `down` (A) and `up` (B), B starting at zero."""

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float):
        super().__init__()
        self.rank = rank
        self.alpha = float(alpha)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.create_parameters(base)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def create_parameters(self, base: nn.Module) -> None:
        raise NotImplementedError

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def added_to(self, output: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The base layer's `output` for input `x` with this adapter's delta added."""
        return output + self.delta(x)

    def delta_weight(self) -> torch.Tensor:
        """(alpha / rank) · B·A in the base weight's shape: what merging adds to W."""
        raise NotImplementedError

    def up_parameters(self) -> list[nn.Parameter]:
        """The parameters on the output side of the adapter, which start at zero and map the rank-wide
        hidden state back to the layer's output (LoRA's B / `up`). LoRA+ trains them at a higher learning
        rate (loraplus.py); every other parameter of the layer is on the input side. Each layer kind says
        which of its parameters these are (e.g. LoHa: both Hadamard factors' up matrices)."""
        raise NotImplementedError


class LinearLora(LoraLayer):
    def create_parameters(self, base: nn.Linear) -> None:
        out_features, in_features = base.weight.shape
        self.down = nn.Parameter(torch.empty(self.rank, in_features, dtype=torch.float32))
        self.up = nn.Parameter(torch.zeros(out_features, self.rank, dtype=torch.float32))
        nn.init.kaiming_uniform_(self.down, a=math.sqrt(5))

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """A(dropout(x)), the rank-wide activation. Parameters follow the activation's dtype so a
        bf16 base works without autocast."""
        return F.linear(self.dropout(x), self.down.to(x.dtype))

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.hidden(x), self.up.to(x.dtype)) * self.scale

    def added_to(self, output: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        device = x.device.type
        # Under autocast addmm would compute, and return, the autocast dtype: fp32 outputs keep the sum.
        autocast_changes_dtype = torch.is_autocast_enabled(device) and output.dtype != torch.get_autocast_dtype(device)
        if output.dtype != x.dtype or x.ndim < 2 or autocast_changes_dtype:
            return super().added_to(output, x)
        # One GEMM adds scale · hidden · upᵀ into the output: no separate kernels for the scale and
        # the sum (SDXL's ~700 adapted layers launch them in forward and recompute; bench/NOTES.md §6).
        summed = torch.addmm(output.reshape(-1, output.shape[-1]), self.hidden(x).reshape(-1, self.rank),
                             self.up.to(x.dtype).t(), alpha=self.scale)
        return summed.view(output.shape)

    def delta_weight(self) -> torch.Tensor:
        return (self.up @ self.down) * self.scale

    def up_parameters(self) -> list[nn.Parameter]:
        return [self.up]


class ConvLora(LoraLayer):
    """LoCon: `down` is a convolution with the base layer's kernel, stride and padding; `up` is 1x1."""

    def create_parameters(self, base: nn.Conv2d) -> None:
        out_channels, in_channels, kh, kw = base.weight.shape
        self.stride, self.padding, self.dilation = base.stride, base.padding, base.dilation
        if base.groups != 1:
            raise ValueError("grouped convolutions cannot take a LoCon adapter; exclude them with an exclude pattern")
        self.down = nn.Parameter(torch.empty(self.rank, in_channels, kh, kw, dtype=torch.float32))
        self.up = nn.Parameter(torch.zeros(out_channels, self.rank, 1, 1, dtype=torch.float32))
        nn.init.kaiming_uniform_(self.down, a=math.sqrt(5))

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        hidden = F.conv2d(self.dropout(x), self.down.to(x.dtype), None, self.stride, self.padding, self.dilation)
        return F.conv2d(hidden, self.up.to(x.dtype)) * self.scale

    def delta_weight(self) -> torch.Tensor:
        up = self.up.flatten(1)
        down = self.down.flatten(1)
        return ((up @ down) * self.scale).reshape(self.up.shape[0], *self.down.shape[1:])

    def up_parameters(self) -> list[nn.Parameter]:
        return [self.up]


def lora_layer_for(base: nn.Module, config: LoraConfig) -> LoraLayer:
    if isinstance(base, nn.Linear):
        return LinearLora(base, config.rank, config.alpha, config.dropout)
    if isinstance(base, nn.Conv2d):
        return ConvLora(base, config.rank, config.alpha, config.dropout)
    raise TypeError(f"no LoRA layer for {type(base).__name__}")


def select_targets(diffusion_model: nn.Module, layer_kind, config: LoraConfig) -> list[str]:
    """Names (inside the diffusion model) of the layers to adapt.

    `layer_kind(name, module)` is the family's classifier; a layer is kept when its kind is in
    the config's preset, it matches every include pattern given (any of them) and no exclude.
    """
    include = [re.compile(p) for p in config.include]
    exclude = [re.compile(p) for p in config.exclude]
    names = []
    for name, module in diffusion_model.named_modules():
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        if layer_kind(name, module) not in config.layer_kinds:
            continue
        if include and not any(p.search(name) for p in include):
            continue
        if any(p.search(name) for p in exclude):
            continue
        names.append(name)
    if not names:
        raise ValueError(
            f"no layer of the model matches targets={config.targets!r}, include={list(config.include)}, "
            f"exclude={list(config.exclude)}; widen the patterns"
        )
    return names


class LoraNetwork(nn.Module):
    """All LoRA layers of one run, keyed by the base layer's module path inside `diffusion_model`."""

    def __init__(self, layers: dict[str, LoraLayer]):
        super().__init__()
        # ModuleDict keys cannot contain dots.
        self.layers = nn.ModuleDict({name.replace(".", "/"): layer for name, layer in layers.items()})
        # Read by the attached hooks at every call: False runs the base model exactly, hooks in place.
        self.enabled = True

    @classmethod
    def create(cls, diffusion_model: nn.Module, layer_kind, config: LoraConfig) -> "LoraNetwork":
        modules = dict(diffusion_model.named_modules())
        names = select_targets(diffusion_model, layer_kind, config)
        return cls({name: lora_layer_for(modules[name], config) for name in names})

    def items(self) -> Iterator[tuple[str, LoraLayer]]:
        for key, layer in self.layers.items():
            yield key.replace("/", "."), layer

    @contextlib.contextmanager
    def attached(self, diffusion_model: nn.Module):
        """Hooks every LoRA layer onto its base layer; removes them all on exit."""
        modules = dict(diffusion_model.named_modules())
        handles = []
        try:
            for name, layer in self.items():
                if name not in modules:
                    raise KeyError(f"the model has no layer {name!r}; this LoRA was made for another architecture")
                handles.append(modules[name].register_forward_hook(_adder(self, layer)))
            yield self
        finally:
            for handle in handles:
                handle.remove()

    @contextlib.contextmanager
    def disabled(self):
        """The attached model computes as if it had no LoRA for the duration of the `with` block (the
        base model's prediction, e.g. differential output preservation's target); hooks stay in place."""
        was_enabled, self.enabled = self.enabled, False
        try:
            yield self
        finally:
            self.enabled = was_enabled


def _adder(network: LoraNetwork, layer: LoraLayer):
    def hook(module, args, output):
        # None leaves the base layer's output as it is.
        return layer.added_to(output, args[0]) if network.enabled else None

    return hook
