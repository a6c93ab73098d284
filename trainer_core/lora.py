"""Adapters on the torch modules of a ComfyUI model: LoRA (LoCon on convolutions), LyCORIS' LoHa and
LoKr, and DoRA, each a kind of `LoraLayer` made by `lora_layer_for`.

y = W·x + (alpha / rank) · B(A(dropout(x))) is added by a forward hook, so the base layer
(ComfyUI's cast ops included, fp8-stored weights too) runs exactly as it does without the
LoRA and no W + BA is materialised per step. ComfyUI's patcher clones share their torch
modules, so hooks live only for the duration of a run: `LoraNetwork.attached` installs them
and removes every one on exit, also on error.

Each algorithm computes its delta in activation space (on x, as LoRA does) or in weight space (a
delta weight made each step and applied to x), whichever costs less. Measured with these layers on the
CPU, fp32, one thread, forward + backward of one adapted square linear (bench/adapter_space.py; a busy
shared machine, so the ratios matter, not the times):

| tokens, width, rank | LoHa weight / activation | LoKr (factor 32) weight / activation |
|---|---|---|
| 1024, 1024, 8 | 175 / 31 ms | 159 / 35 ms |
| 1024, 1024, 16 | 165 / 80 ms | 199 / 35 ms |
| 4096, 1024, 16 | 723 / 320 ms | 613 / 107 ms |
| 256, 2048, 16 | 249 / 52 ms | 199 / 13 ms |

Weight space also keeps out x in tensors for backward, activation space only rank-wide ones. DoRA is
LoRA's activation-space delta plus a per-column scale of the input (see `_Dora`). The file holds the
factors ComfyUI's loader expects (`.hada_*`, `.lokr_*`, `.dora_scale`); tests/test_adapters.py checks
that ComfyUI rebuilds the trained outputs from them.
"""

import contextlib
import math
import re
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from . import comfy_compat
from .config import LoraConfig


class LoraLayer(nn.Module):
    """The trainable weights for one base layer. Plain LoRA: `down` (A) and `up` (B), B starting at zero."""

    algorithm = "lora"
    # Whether the layer rescales the base layer's input (DoRA): `attached` then adds a pre-hook.
    scales_input = False

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

    def file_parameters(self) -> dict[str, tuple[nn.Parameter, tuple[int, ...]]]:
        """Key suffix in the LoRA file -> (parameter, its shape in the file), the keys ComfyUI reads."""
        return {"lora_down.weight": (self.down, tuple(self.down.shape)),
                "lora_up.weight": (self.up, tuple(self.up.shape))}

    def file_tensors(self) -> dict[str, torch.Tensor]:
        """The layer's weights under their file key suffixes (`.alpha` aside), detached, in file shapes."""
        return {suffix: parameter.detach().reshape(shape) for suffix, (parameter, shape) in
                self.file_parameters().items()}

    def load_file_tensors(self, tensors: dict[str, torch.Tensor], name: str) -> None:
        """Copies a file's weights (as `file_tensors` names them) into the layer; `name` is for messages."""
        expected = self.file_parameters()
        if tensors.keys() != expected.keys():
            raise ValueError(f"{name}: the file has {sorted(tensors)}, a {self.algorithm} layer needs "
                             f"{sorted(expected)}")
        for suffix, (_, shape) in expected.items():
            if tuple(tensors[suffix].shape) != shape:
                raise ValueError(f"{name}.{suffix}: the file's {tuple(tensors[suffix].shape)} does not fit the "
                                 f"model's layer ({shape}); this LoRA was made for another model size")
        with torch.no_grad():
            for suffix, (parameter, _) in expected.items():
                parameter.copy_(tensors[suffix].reshape(parameter.shape))

    def up_parameters(self) -> list[nn.Parameter]:
        """The parameters on the output side of the adapter: those that map the rank-wide hidden state back
        to the layer's output (LoRA's B / `up`). LoRA+ trains them at a higher learning rate (loraplus.py);
        every other parameter of the layer is on the input side. Each layer kind says which of its
        parameters these are (LoHa: both Hadamard terms' (out, rank) factors; DoRA: LoRA's, its magnitude
        on the input side)."""
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


class _Dora:
    """DoRA (Liu et al. 2024) on top of a LoRA layer: W' = m · (W + ΔW) / ‖W + ΔW‖, the norm taken per
    input column, m (`magnitude`) starting at ‖W‖ so that W' = W at first.

    Per input column, because that is the norm ComfyUI 0.3.75 computes for a `.dora_scale` of shape
    (1, in[, 1, 1]) (`weight_decompose`: for one of shape (out, 1) it divides by the norm of W alone,
    not of W + ΔW, and would not reproduce the training). A column scale on W is a scale on the input:
    W'·x = (W + ΔW)·(s ⊙ x) with s = m / ‖W + ΔW‖, so the base layer runs as it is on the rescaled
    input (a pre-hook) and the LoRA delta is added to its output as for LoRA: activation space.
    The norms come from W without forming W + ΔW: ‖W_j + ΔW_j‖² = ‖W_j‖² + 2·(Bᵀ W)_j·A_j · scale +
    A_jᵀ (BᵀB) A_j · scale², where ‖W_j‖² is kept from the start and Bᵀ W is rank-wide; backward
    keeps only the base weight the forward cast (none for bf16 or fp32 weights, a bf16 copy for fp8
    ones). The norm is not detached (peft detaches it to save memory; here it costs rank-wide tensors).
    """

    algorithm = "dora"
    scales_input = True

    def create_parameters(self, base: nn.Module) -> None:
        super().create_parameters(base)
        # As the layer's forward will read it (fp8 and quantised storage decoded), in fp32 where it lies.
        weight = comfy_compat.layer_weight(base, torch.empty((), device=base.weight.device)).detach()
        columns = weight.transpose(0, 1).reshape(weight.shape[1], -1)
        squared = columns.square().sum(1)
        # ‖W_j‖², fixed with the base weight; rebuilt from it when the layer is made again (resume).
        self.register_buffer("base_norm_squared", squared, persistent=False)
        self.magnitude = nn.Parameter(squared.sqrt())

    def column_scale(self, base: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """s = m / (‖W + ΔW‖ + eps) per input column, fp32; eps as ComfyUI adds it (fp32 weights)."""
        weight = comfy_compat.layer_weight(base, x)
        rank, in_features = self.down.shape[0], self.down.shape[1]
        weight = weight.reshape(weight.shape[0], in_features, -1)  # (out, in, kernel elements)
        up = self.up.reshape(-1, rank)
        down = self.down.float().reshape(rank, in_features, -1)
        projected = torch.einsum("or,oik->rik", up.to(weight.dtype), weight).float()
        # The rank-wide rest in fp32 also under bf16 autocast: the norms' terms nearly cancel where ΔW ≈ -W.
        with torch.autocast(x.device.type, enabled=False):
            cross = (projected * down).sum((0, 2))
            gram = up.t() @ up
            quadratic = ((gram @ down.reshape(rank, -1)).reshape(down.shape) * down).sum((0, 2))
            squared = self.base_norm_squared + 2 * self.scale * cross + self.scale**2 * quadratic
            return self.magnitude / (squared.clamp_min(0).sqrt() + torch.finfo(torch.float32).eps)

    def scaled_input(self, base: nn.Module, x: torch.Tensor) -> torch.Tensor:
        scale = self.column_scale(base, x).to(x.dtype)
        return x * (scale.view(-1, 1, 1) if x.ndim == 4 and self.down.ndim == 4 else scale)

    def file_parameters(self) -> dict[str, tuple[nn.Parameter, tuple[int, ...]]]:
        extra = (1,) * (self.down.ndim - 2)
        return super().file_parameters() | {"dora_scale": (self.magnitude, (1, self.magnitude.shape[0], *extra))}


class LinearDora(_Dora, LinearLora):
    pass


class ConvDora(_Dora, ConvLora):
    pass


class _WeightSpace(LoraLayer):
    """An adapter whose delta can be applied as a weight: F.linear / F.conv2d of x with `delta_weight`."""

    def remember_base(self, base: nn.Module) -> tuple[int, int]:
        """Keeps what applying a delta weight needs; returns (out, in) of the base weight, kernel aside."""
        if isinstance(base, nn.Conv2d):
            if base.groups != 1:
                raise ValueError(f"grouped convolutions cannot take a {self.algorithm} adapter; exclude them "
                                 "with an exclude pattern")
            self.conv = (base.stride, base.padding, base.dilation)
        else:
            self.conv = None
        self.weight_shape = tuple(base.weight.shape)
        return self.weight_shape[0], self.weight_shape[1]

    def apply_delta_weight(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.delta_weight(x.dtype)
        if self.conv is None:
            return F.linear(self.dropout(x), weight)
        return F.conv2d(self.dropout(x), weight, None, *self.conv)


class Loha(_WeightSpace):
    """LyCORIS' LoHa: ΔW = (w1_a·w1_b) ⊙ (w2_a·w2_b) · alpha / rank, LyCORIS' initialisation (w2_a zero).

    The Hadamard product of two rank-r products is a rank-r² product (rows of w1_b ⊙ w2_b, the
    Khatri-Rao product), so a linear layer takes it in activation space while r² · (in + out) <
    in · out (fewer multiplications than x·ΔWᵀ; two to five times faster in the measurements above)
    and in weight space beyond. Convolutions take it in weight space.
    """

    algorithm = "loha"

    def create_parameters(self, base: nn.Module) -> None:
        out_features, in_features = self.remember_base(base)
        fan_in = math.prod(self.weight_shape[1:])
        self.hada_w1_a = nn.Parameter(torch.empty(out_features, self.rank).normal_(std=0.1))
        self.hada_w1_b = nn.Parameter(torch.empty(self.rank, fan_in).normal_(std=1.0))
        self.hada_w2_a = nn.Parameter(torch.zeros(out_features, self.rank))
        self.hada_w2_b = nn.Parameter(torch.empty(self.rank, fan_in).normal_(std=1.0))
        self.khatri_rao = self.conv is None and self.rank**2 * (in_features + out_features) < in_features * out_features

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        if not self.khatri_rao:
            return self.apply_delta_weight(x)
        rank, dtype = self.rank, x.dtype
        rows = (self.hada_w1_b.to(dtype)[:, None] * self.hada_w2_b.to(dtype)[None]).reshape(rank * rank, -1)
        columns = (self.hada_w1_a.to(dtype)[:, :, None] * self.hada_w2_a.to(dtype)[:, None]).reshape(-1, rank * rank)
        return F.linear(F.linear(self.dropout(x), rows), columns) * self.scale

    def delta_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        first = self.hada_w1_a.to(dtype) @ self.hada_w1_b.to(dtype)
        second = self.hada_w2_a.to(dtype) @ self.hada_w2_b.to(dtype)
        return (first * second * self.scale).reshape(self.weight_shape)

    def file_parameters(self) -> dict[str, tuple[nn.Parameter, tuple[int, ...]]]:
        return {name: (getattr(self, name), tuple(getattr(self, name).shape))
                for name in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")}

    def up_parameters(self) -> list[nn.Parameter]:
        return [self.hada_w1_a, self.hada_w2_a]


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """(m, n), m <= n, m · n = dimension: m = `factor` where it divides and m <= n, else the divisor pair
    closest to each other with m <= factor (-1: no bound). LyCORIS' rule, which ComfyUI's own LoKr
    trainer uses too, so that files of a factor have the shapes other tools make."""
    if factor > 0 and dimension % factor == 0 and dimension >= factor * factor:
        return factor, dimension // factor
    bound = dimension if factor < 0 else factor
    m, n = 1, dimension
    for candidate in range(2, math.isqrt(dimension) + 1):
        if candidate > bound:
            break
        if dimension % candidate == 0:
            m, n = candidate, dimension // candidate
    return m, n


class Lokr(_WeightSpace):
    """LyCORIS' LoKr: ΔW = kron(w1, w2) · scale, w1 (out1, in1) small, w2 (out2, in2[, kh, kw]) full or
    w2_a·w2_b of rank `rank`; out = out1·out2 and in = in1·in2 split by `factorization(…, factor)`.
    w2 is low-rank unless `full_rank` or rank >= max(out2, in2) / 2 (LyCORIS' rule); the scale is
    alpha / rank for a low-rank w2 and 1 for a full one (what ComfyUI applies: it reads no rank then).
    Initialisation as LyCORIS: w1 and w2_a Kaiming-uniform, w2 (or w2_b) zero.

    A Kronecker product acts on x reshaped to (in1, in2): kron(w1, w2)·x = w1 · X · w2ᵀ, so a linear layer
    takes it in activation space at (in·out / factor + factor·out) multiplications per token instead of
    in·out, without forming ΔW (four to fifteen times faster in the measurements above). Convolutions take it in
    weight space.
    """

    algorithm = "lokr"

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float, factor: int, full_rank: bool):
        self.factor, self.full_rank_asked = factor, full_rank
        super().__init__(base, rank, alpha, dropout)

    def create_parameters(self, base: nn.Module) -> None:
        out_features, in_features = self.remember_base(base)
        (out1, out2), (in1, in2) = factorization(out_features, self.factor), factorization(in_features, self.factor)
        kernel = self.weight_shape[2:]
        self.full_rank = self.full_rank_asked or self.rank >= max(out2, in2) / 2
        self.lokr_w1 = nn.Parameter(torch.empty(out1, in1))
        nn.init.kaiming_uniform_(self.lokr_w1, a=math.sqrt(5))
        if self.full_rank:
            self.lokr_w2 = nn.Parameter(torch.zeros(out2, in2, *kernel))
        else:
            self.lokr_w2_a = nn.Parameter(torch.empty(out2, self.rank))
            nn.init.kaiming_uniform_(self.lokr_w2_a, a=math.sqrt(5))
            self.lokr_w2_b = nn.Parameter(torch.zeros(self.rank, in2 * math.prod(kernel)))

    @property
    def scale(self) -> float:
        return 1.0 if self.full_rank else self.alpha / self.rank

    def second(self, dtype: torch.dtype) -> torch.Tensor:
        """w2 as (out2, in2 · kernel elements)."""
        if self.full_rank:
            return self.lokr_w2.to(dtype).flatten(1)
        return self.lokr_w2_a.to(dtype) @ self.lokr_w2_b.to(dtype)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        if self.conv is not None:
            return self.apply_delta_weight(x)
        out1, in1 = self.lokr_w1.shape
        grid = self.dropout(x).reshape(*x.shape[:-1], in1, -1)  # (..., in1, in2)
        if self.full_rank:
            inner = F.linear(grid, self.lokr_w2.to(x.dtype))  # (..., in1, out2)
        else:
            inner = F.linear(F.linear(grid, self.lokr_w2_b.to(x.dtype)), self.lokr_w2_a.to(x.dtype))
        outer = torch.matmul(self.lokr_w1.to(x.dtype), inner)  # (..., out1, out2)
        return outer.reshape(*x.shape[:-1], -1) * self.scale

    def delta_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (torch.kron(self.lokr_w1.to(dtype), self.second(dtype)) * self.scale).reshape(self.weight_shape)

    def file_parameters(self) -> dict[str, tuple[nn.Parameter, tuple[int, ...]]]:
        names = ("lokr_w1", "lokr_w2") if self.full_rank else ("lokr_w1", "lokr_w2_a", "lokr_w2_b")
        return {name: (getattr(self, name), tuple(getattr(self, name).shape)) for name in names}

    def up_parameters(self) -> list[nn.Parameter]:
        # A full w2 has no rank-wide side: the factor that starts at zero (as LoRA's B does) takes the ratio.
        return [self.lokr_w2] if self.full_rank else [self.lokr_w2_a]


def lora_layer_for(base: nn.Module, config: LoraConfig) -> LoraLayer:
    """The adapter of `config.algorithm` for a linear or convolution layer."""
    if not isinstance(base, (nn.Linear, nn.Conv2d)):
        raise TypeError(f"no LoRA layer for {type(base).__name__}")
    linear = isinstance(base, nn.Linear)
    common = (base, config.rank, config.alpha, config.dropout)
    if config.algorithm == "lokr":
        return Lokr(*common, factor=config.lokr_factor, full_rank=config.lokr_full_rank)
    kind = {"lora": (LinearLora, ConvLora), "dora": (LinearDora, ConvDora), "loha": (Loha, Loha)}[config.algorithm]
    return kind[0 if linear else 1](*common)


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
                if layer.scales_input:
                    handles.append(modules[name].register_forward_pre_hook(_input_scaler(self, layer)))
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


def _input_scaler(network: LoraNetwork, layer: LoraLayer):
    def hook(module, args):
        # None leaves the base layer's input as it is.
        return (layer.scaled_input(module, args[0]), *args[1:]) if network.enabled else None

    return hook
