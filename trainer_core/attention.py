"""Which fused attention kernel a run asks PyTorch's scaled_dot_product_attention for first.

cuDNN's fused attention runs Flux's and SD3's attention at 1.4-2x FlashAttention-2's rate on an
H100 (bench/NOTES.md §4), but with an earlier cuDNN its backward faulted on Flux's shape (an
illegal memory access, DESIGN.md §7), and a CUDA fault ends the process's use of the GPU. So
"auto" takes it only where it was measured (Hopper, cuDNN 9.19 or newer) and after its backward
has run once, on the families' shapes and layouts, in a child process.
"""

import contextlib
import functools
import inspect
import logging
import subprocess
import sys

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

log = logging.getLogger(__name__)

MEASURED_CUDNN = 91900
MEASURED_ARCHITECTURE = 9  # Hopper (H100, H200): compute capability 9.x
# What every kernel falls back to, in order, for inputs the one before refuses (fp32, masks, wide heads).
FALLBACKS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]

PROBE = """
import sys, torch, torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
device = torch.device(sys.argv[1])
# At 1024²: Flux dev's 4,096 image + 512 text tokens, 24 heads of 128 (contiguous, as Flux hands them
# over); SD3.5's 4,096 + 154 tokens and SDXL's self- and cross-attention (77 text tokens), heads of 64, as
# ComfyUI splits them from (batch, tokens, heads · width): a view, transposed.
for heads, queries, keys, width, split in ((24, 4608, 4608, 128, False), (24, 4250, 4250, 64, True),
                                           (10, 4096, 4096, 64, True), (10, 4096, 77, 64, True)):
    def make(tokens):
        flat = torch.randn(1, tokens, heads * width, device=device, dtype=torch.bfloat16)
        heads_first = flat.view(1, tokens, heads, width).transpose(1, 2)
        return (heads_first if split else heads_first.contiguous()).requires_grad_()
    q, k, v = make(queries), make(keys), make(keys)
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        F.scaled_dot_product_attention(q, k, v).float().square().mean().backward()
torch.cuda.synchronize(device)
print("ok")
"""


def cudnn_attention_fault(device: torch.device) -> str | None:
    """None when cuDNN's attention forward and backward run on the families' shapes on this GPU,
    else what went wrong. Runs in a child process, since a CUDA fault would poison this one."""
    return _probe(str(device))


@functools.cache
def _probe(device: str) -> str | None:
    try:
        child = subprocess.run([sys.executable, "-c", PROBE, device], capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"the probe did not finish: {error}"
    if child.returncode == 0 and child.stdout.strip().endswith("ok"):
        return None
    lines = (child.stderr or child.stdout).strip().splitlines()
    return f"exit {child.returncode}: {lines[-1] if lines else 'no output'}"[:300]


def kernel_order(choice: str, device: torch.device) -> list[SDPBackend]:
    """SDPA's kernels in the order a run tries them, for TrainConfig.attention `choice`."""
    if choice == "auto":
        choice = "cudnn" if _cudnn_measured_good(device) else "flash"
    return [SDPBackend.CUDNN_ATTENTION, *FALLBACKS] if choice == "cudnn" else list(FALLBACKS)


def _cudnn_measured_good(device: torch.device) -> bool:
    if device.type != "cuda" or not torch.backends.cudnn.is_available():
        return False
    measured = (torch.cuda.get_device_capability(device)[0] == MEASURED_ARCHITECTURE
                and torch.backends.cudnn.version() >= MEASURED_CUDNN)
    if not measured:
        return False
    fault = cudnn_attention_fault(device)
    if fault is not None:
        log.warning("cuDNN's attention failed its check on %s (%s); training uses flash attention", device, fault)
    return fault is None


def kernels_in_order(kernels: list[SDPBackend]) -> contextlib.AbstractContextManager:
    """SDPA limited to `kernels`, tried in their order where torch can order them (2.6 and newer;
    before, in torch's own order: flash before cuDNN)."""
    if "set_priority" in inspect.signature(sdpa_kernel).parameters:
        return sdpa_kernel(kernels, set_priority=True)
    return sdpa_kernel(kernels)
