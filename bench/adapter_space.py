"""Activation space or weight space for LoHa and LoKr: forward + backward of the engine's layers on one adapted
square linear, on the CPU in fp32, each way (the numbers in trainer_core/lora.py's docstring).

Run: `.venv/bin/python bench/adapter_space.py` (one thread; a few seconds per row).
"""

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def milliseconds(step, x, repeats: int) -> float:
    """Mean time of `repeats` forward + backward passes after two warm-up ones."""
    for _ in range(2):
        step(x).sum().backward()
    started = time.perf_counter()
    for _ in range(repeats):
        step(x).sum().backward()
    return (time.perf_counter() - started) / repeats * 1000


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO))
    from trainer_core.cli import import_comfyui

    import_comfyui(cpu=True)
    import torch
    from torch import nn

    from trainer_core.config import LoraConfig
    from trainer_core.lora import lora_layer_for

    torch.set_num_threads(1)
    torch.manual_seed(0)
    for tokens, width, rank in ((1024, 1024, 8), (1024, 1024, 16), (4096, 1024, 16), (256, 2048, 16)):
        base = nn.Linear(width, width)
        x = torch.randn(tokens, width, requires_grad=True)
        loha = lora_layer_for(base, LoraConfig(rank=rank, algorithm="loha"))
        # The Khatri-Rao (activation) form whatever the rank, against the delta weight.
        loha.khatri_rao = True
        lokr = lora_layer_for(base, LoraConfig(rank=rank, algorithm="lokr", lokr_factor=32))
        timings = [milliseconds(step, x, args.repeats) for step in (
            loha.apply_delta_weight, loha.delta, lokr.apply_delta_weight, lokr.delta)]
        print(f"tokens {tokens}, {width}x{width}, rank {rank}: LoHa weight {timings[0]:.1f} ms, activation "
              f"{timings[1]:.1f} ms; LoKr (factor 32) weight {timings[2]:.1f} ms, activation {timings[3]:.1f} ms")


if __name__ == "__main__":
    main()
