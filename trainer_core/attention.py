"""Which fused attention kernel a run asks PyTorch's scaled_dot_product_attention for first.

cuDNN's fused attention runs Flux's and SD3's attention at 1.4-2x FlashAttention-2's rate on an
H100 (bench/NOTES.md §4), but with an earlier cuDNN its backward faulted on Flux's shape (an
illegal memory access, DESIGN.md §7), and a CUDA fault ends the process's use of the GPU. So
"auto" takes it only where it was measured (compute capability 9.0 or newer, cuDNN 9.19 or
newer) and after its backward has run once, on the families' shapes, in a child process.
"""

import functools
import logging
import subprocess
import sys

import torch
from torch.nn.attention import SDPBackend

log = logging.getLogger(__name__)

MEASURED_CUDNN = 91900
MEASURED_CAPABILITY = (9, 0)
# What every kernel falls back to, in order, for inputs the one before refuses (fp32, masks, wide heads).
FALLBACKS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]

PROBE = """
import sys, torch, torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
device = torch.device(sys.argv[1])
# Flux dev at 1024²: 4,096 image + 512 text tokens, 24 heads of 128; SD3.5: 4,096 + 154 tokens, heads of 64.
for heads, tokens, width in ((24, 4608, 128), (24, 4250, 64)):
    q, k, v = (torch.randn(1, heads, tokens, width, device=device, dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
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
    measured = (torch.cuda.get_device_capability(device) >= MEASURED_CAPABILITY
                and torch.backends.cudnn.version() >= MEASURED_CUDNN)
    if not measured:
        return False
    fault = cudnn_attention_fault(device)
    if fault is not None:
        log.warning("cuDNN's attention failed its check on %s (%s); training uses flash attention", device, fault)
    return fault is None
