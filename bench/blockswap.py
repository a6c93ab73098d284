"""What block swap can hide: host-to-card copy time of one block against its compute, per block kind, on one GPU.

    python bench/blockswap.py [--models flux,sd35l] [--weights fp8,bf16] [--resolution 1024] [--json FILE]
    python bench/blockswap.py --smoke          # the same code on the CPU with tiny models (numbers mean nothing)

For each model (full-size architecture, random weights, bench/architectures.py) and weight dtype:
- the copy bandwidth from pinned host memory to the card for one large buffer (the link's rate) and for each
  block kind's own tensors (many tensors per block: what block swap copies), on a side stream as block swap
  does, timed with CUDA events, median of `--repeats`;
- each block kind's compute at the given resolution, batch 1, bf16 autocast, with the inputs the model gives
  it (captured in one forward): the forward, and the recompute plus backward of a checkpointed block (input
  gradients only, as for a frozen block under a LoRA; the LoRA's own small GEMMs are left out);
- from those, for 16 and 28 swapped blocks of the model's order (kohya's choices for 12 GB and 8 GB cards)
  spread as `trainer_core.blockswap.swapped_indices` spreads them, the copy time that compute cannot hide:
  each swapped block's copy starts when the block before it starts and overlaps the compute of the blocks up
  to it (forward), or the recompute and backward of those blocks (backward). A lower bound on what swapping
  adds to a step; the real run (bench/realrun.py --blocks-to-swap) measures the rest.
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GIB = 1024**3
SWAP_COUNTS = (16, 28)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="flux,sd35l", help="comma list of sdxl, sd35m, sd35l, flux")
    parser.add_argument("--weights", default="fp8,bf16", help="comma list of fp8, bf16 (stored weight dtype)")
    parser.add_argument("--resolution", type=int, default=None, help="image side (default 1024; smoke 64)")
    parser.add_argument("--repeats", type=int, default=10, help="timings per measurement, the median is kept")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--smoke", action="store_true", help="tiny models on the CPU, to check the script")
    args = parser.parse_args(argv)
    if args.resolution is None:
        args.resolution = 64 if args.smoke else 1024
    return args


class Timer:
    """Elapsed milliseconds of `fn()`: CUDA events on the current stream on a GPU, the wall clock on the CPU."""

    def __init__(self, device):
        self.device = device

    def median_ms(self, fn, repeats: int) -> float:
        import torch

        fn()  # warm-up: allocator, kernels, lazy state
        times = []
        for _ in range(repeats):
            if self.device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                began = time.perf_counter()
                fn()
                times.append((time.perf_counter() - began) * 1000)
        return statistics.median(times)


def copy_ms(tensors, device, repeats: int) -> float:
    """Median time to copy `tensors` (host memory, pinned on a GPU) into fresh device tensors on a side stream,
    as BlockSwapper does."""
    import torch

    if device.type != "cuda":
        return Timer(device).median_ms(lambda: [t.to(device, copy=True) for t in tensors], repeats)
    stream = torch.cuda.Stream(device)
    times = []
    for _ in range(repeats + 1):
        with torch.cuda.stream(stream):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(stream)
            copies = [torch.empty_like(t, device=device) for t in tensors]
            for copy, tensor in zip(copies, tensors, strict=True):
                copy.copy_(tensor, non_blocking=True)
            end.record(stream)
        end.synchronize()
        times.append(start.elapsed_time(end))
        del copies
    return statistics.median(times[1:])


def captured_block_inputs(family, blocks, arch, resolution: int, device):
    """(args, kwargs) of the first call of each block kind in one forward of the model."""
    import torch
    from architectures import random_dataset

    kinds = {}
    for block in blocks:
        kinds.setdefault(type(block).__name__, block)
    captured = {}

    def capture(name):
        def hook(module, args, kwargs):
            if name not in captured:
                detach = [a.detach().clone() if isinstance(a, torch.Tensor) else a for a in args]
                kw = {k: v.detach().clone() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
                captured[name] = (detach, kw)
        return hook

    handles = [block.register_forward_pre_hook(capture(name), with_kwargs=True) for name, block in kinds.items()]
    latents, texts = random_dataset(arch, 1, resolution)
    conditioning = {k: v[None].to(device) for k, v in family.conditioning(texts[0].cond, texts[0].pooled, resolution,
                                                                           resolution).items()}
    latents = latents.to(device)
    try:
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
            timesteps = family.sample_timesteps(latents, torch.Generator(device).manual_seed(0))
            family.predict(latents, timesteps, conditioning)
    finally:
        for handle in handles:
            handle.remove()
    return kinds, captured


def block_compute_ms(block, inputs, device, repeats: int) -> tuple[float, float]:
    """(forward, recompute + backward) of a frozen block at its captured inputs, in milliseconds."""
    import torch

    args, kwargs = inputs
    timer = Timer(device)
    # Frozen, as under a LoRA: no gradient of its own weights (fp8 ones could not even take one).
    block.requires_grad_(False)

    def fresh():
        # A copy of a leaf that wants its gradient: blocks that add into their inputs in place (Flux's) get a
        # tensor they may change, as the checkpoint's copied inputs are.
        def ready(a):
            if not isinstance(a, torch.Tensor):
                return a
            return a.clone().requires_grad_().clone() if a.is_floating_point() else a.clone()
        return [ready(a) for a in args], {k: ready(v) for k, v in kwargs.items()}

    def forward():
        a, k = fresh()
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
            block(*a, **k)

    def recompute_and_backward():
        a, k = fresh()
        with torch.enable_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
            out = block(*a, **k)
        outputs = [o for o in (out if isinstance(out, tuple) else (out,)) if isinstance(o, torch.Tensor)]
        torch.autograd.backward(outputs, [torch.ones_like(o) for o in outputs])

    return timer.median_ms(forward, repeats), timer.median_ms(recompute_and_backward, repeats)


def exposed_copy_ms(order: list[str], per_kind: dict, swap_count: int) -> tuple[float, float]:
    """(forward, backward) copy time per step that compute cannot hide with `swap_count` blocks swapped."""
    from trainer_core.blockswap import swapped_indices

    swapped = swapped_indices(len(order), swap_count)
    exposed_forward = exposed_backward = 0.0
    for position, index in enumerate(swapped):
        copy = per_kind[order[index]]["copy_ms"]
        # Forward: the copy starts when the previous swapped block (or the first block) starts.
        previous = swapped[position - 1] if position else 0
        window = sum(per_kind[order[i]]["forward_ms"] for i in range(previous, index))
        exposed_forward += max(0.0, copy - window)
        # Backward runs in reverse: the copy starts at the next swapped block's recompute (or the last block's).
        following = swapped[position + 1] if position + 1 < len(swapped) else len(order) - 1
        window = sum(per_kind[order[i]]["backward_ms"] for i in range(index + 1, following + 1))
        exposed_backward += max(0.0, copy - window)
    return exposed_forward, exposed_backward


def measure(arch, weight_dtype, args, device) -> dict:
    from architectures import build

    from trainer_core import comfy_compat
    from trainer_core.blockswap import tensor_bytes
    from trainer_core.config import TrainConfig
    from trainer_core.families import family_for

    patcher = build(arch, weight_dtype, device, check_detection=not args.smoke)
    family = family_for(patcher.model, TrainConfig())
    blocks = family.checkpoint_blocks()
    order = [type(b).__name__ for b in blocks]
    kinds, captured = captured_block_inputs(family, blocks, arch, args.resolution, device)
    per_kind = {}
    with family.training_patches():
        for name, block in kinds.items():
            tensors = [t.detach().to("cpu") for t in (*block.parameters(), *block.buffers())]
            if device.type == "cuda":
                tensors = [t.pin_memory() for t in tensors]
            size = tensor_bytes(block)
            copy = copy_ms(tensors, device, args.repeats)
            # As in a training session: ComfyUI 0.33 otherwise picks fused kernels with no backward (Flux's RoPE).
            with comfy_compat.training_mode(True):
                forward, backward = block_compute_ms(block, captured[name], device, args.repeats)
            per_kind[name] = {"count": order.count(name), "bytes": size, "copy_ms": copy,
                              "copy_gb_per_s": size / copy / 1e6, "forward_ms": forward, "backward_ms": backward}
    result = {"model": arch.label, "weights": str(weight_dtype).removeprefix("torch."), "blocks": len(blocks),
              "resolution": args.resolution, "per_kind": per_kind, "exposed": {}}
    for count in SWAP_COUNTS:
        if count <= len(blocks):
            forward, backward = exposed_copy_ms(order, per_kind, count)
            result["exposed"][count] = {"forward_ms": forward, "backward_ms": backward}
    del patcher
    return result


def link_rate(device, repeats: int) -> float | None:
    """GB/s of one 1 GiB copy from pinned host memory on a side stream; None off CUDA."""
    import torch

    if device.type != "cuda":
        return None
    host = torch.empty(GIB, dtype=torch.uint8).pin_memory()
    return GIB / copy_ms([host], device, repeats) / 1e6


def report(results: list[dict], link: float | None) -> str:
    lines = [f"pinned host -> card, one 1 GiB buffer: {link:.1f} GB/s" if link else "no CUDA: CPU copies", ""]
    lines.append("| model | weights | block | count | MB | copy ms | GB/s | forward ms | recompute+backward ms |")
    lines.append("|---|---|---|---|---|---|---|---|---|")
    for result in results:
        for name, kind in result["per_kind"].items():
            lines.append(f"| {result['model']} | {result['weights']} | {name} | {kind['count']} | "
                         f"{kind['bytes'] / 1e6:.0f} | {kind['copy_ms']:.2f} | {kind['copy_gb_per_s']:.1f} | "
                         f"{kind['forward_ms']:.2f} | {kind['backward_ms']:.2f} |")
    lines += ["", "copy time compute cannot hide, per step (ms; forward / backward):"]
    for result in results:
        for count, exposed in result["exposed"].items():
            lines.append(f"- {result['model']} {result['weights']}, {count} of {result['blocks']} blocks swapped: "
                         f"{exposed['forward_ms']:.1f} / {exposed['backward_ms']:.1f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(REPO / "bench"))
    from bench import import_host

    import_host(cpu=args.smoke)
    import torch
    from architectures import FULL, SMOKE

    device = torch.device("cpu") if args.smoke else torch.device("cuda")
    architectures = SMOKE if args.smoke else FULL
    dtypes = {"fp8": torch.float8_e4m3fn, "bf16": torch.bfloat16}
    results = []
    for model in args.models.split(","):
        for weights in args.weights.split(","):
            print(f"{model} {weights}", flush=True)
            results.append(measure(architectures[model], dtypes[weights], args, device))
            if device.type == "cuda":
                torch.cuda.empty_cache()
    text = report(results, link_rate(device, args.repeats))
    print(text)
    if args.json:
        args.json.write_text(json.dumps({"link_gb_per_s": link_rate(device, 3), "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
