"""Attention kernels on the shapes this pack trains, one GPU: PyTorch's SDPA backends side by side.

For every attention call shape of SDXL, SD3.5 Medium/Large and Flux dev at 1024², batch 1, bf16, in the
memory layout ComfyUI hands them over (SDXL and SD3: heads split from (B, L, H·D) by a view and a
transpose; Flux: contiguous (B, H, L, D)), and for each backend (flash = FlashAttention-2, cudnn =
cuDNN's fused attention, efficient = memory-efficient): median time of the forward and of forward +
backward over 20 calls after 3 warm-ups (CUDA events), the rate in TFLOP/s (forward 4·B·H·Lq·Lk·D,
backward 2.5 times that), and the largest difference of the output and of the three input gradients
from the flash backend's, relative to the largest magnitude of the flash result. Each backend runs in a
child process, so a CUDA fault in one (cuDNN's backward once faulted on Flux's shape) is a result.

    python bench/attention.py [--json FILE]
"""

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

BACKENDS = ("flash", "cudnn", "efficient")
# name: (heads, query tokens, key tokens, head width, ComfyUI's layout is a transposed view); calls per forward.
SHAPES = {
    # SDXL: 10 transformer layers at 64² (input 2 × 2, output 3 × 2), 60 at 32² (input 2 × 10, middle 10,
    # output 3 × 10), each one self- and one cross-attention.
    "sdxl self 64²": ((10, 4096, 4096, 64, True), 10),
    "sdxl cross 64²": ((10, 4096, 77, 64, True), 10),
    "sdxl self 32²": ((20, 1024, 1024, 64, True), 60),
    "sdxl cross 32²": ((20, 1024, 77, 64, True), 60),
    "sd35m joint": ((24, 4250, 4250, 64, True), 24),
    "sd35m image self": ((24, 4096, 4096, 64, True), 13),
    "sd35l joint": ((38, 4250, 4250, 64, True), 38),
    "flux joint": ((24, 4608, 4608, 128, False), 57),
}
CHILD = "--child"


def measure(backend: str) -> dict:
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    kernels = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
               "efficient": SDPBackend.EFFICIENT_ATTENTION}

    def inputs(heads, lq, lk, width, comfy_view, seed):
        generator = torch.Generator("cuda").manual_seed(seed)

        def make(tokens):
            flat = torch.randn(1, tokens, heads * width, device="cuda", dtype=torch.bfloat16, generator=generator)
            split = flat.view(1, tokens, heads, width).transpose(1, 2)
            return (split if comfy_view else split.contiguous()).detach().requires_grad_()

        return make(lq), make(lk), make(lk)

    def run(kernel, q, k, v, grad):
        with sdpa_kernel([kernel]):
            out = F.scaled_dot_product_attention(q, k, v)
        q.grad = k.grad = v.grad = None
        out.backward(grad)
        return out.detach(), q.grad, k.grad, v.grad

    def timed(fn, repeats=20, warmup=3):
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        return statistics.median(times)

    def measure_shape(kernel, heads, lq, lk, width, comfy_view) -> dict:
        q, k, v = inputs(heads, lq, lk, width, comfy_view, seed=0)
        grad = torch.randn(1, heads, lq, width, device="cuda", dtype=torch.bfloat16,
                           generator=torch.Generator("cuda").manual_seed(1))
        reference = run(kernels["flash"], q, k, v, grad)
        got = run(kernel, q, k, v, grad)
        entry = {"max_rel_diff": max(((a.float() - b.float()).abs().max() / b.float().abs().max()).item()
                                     for a, b in zip(got, reference, strict=True))}

        def forward():
            with torch.no_grad(), sdpa_kernel([kernel]):
                F.scaled_dot_product_attention(q, k, v)

        entry["forward_s"] = timed(forward)
        entry["forward_backward_s"] = timed(lambda: run(kernel, q, k, v, grad))
        flops = 4 * heads * lq * lk * width
        entry["forward_tflops"] = flops / entry["forward_s"] / 1e12
        entry["forward_backward_tflops"] = 3.5 * flops / entry["forward_backward_s"] / 1e12
        return entry

    results = {}
    for name, (shape, _calls) in SHAPES.items():
        try:
            results[name] = measure_shape(kernels[backend], *shape)
        except RuntimeError as error:
            results[name] = {"error": (str(error).strip().splitlines() or [""])[0][:200]}
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument(CHILD, choices=BACKENDS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.child)))
        return 0
    import torch

    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}")
    results = {}
    for backend in BACKENDS:
        child = subprocess.run([sys.executable, __file__, CHILD, backend], capture_output=True, text=True, timeout=300)
        lines = child.stdout.strip().splitlines()
        if child.returncode == 0 and lines:
            results[backend] = json.loads(lines[-1])
        else:
            tail = (child.stderr or child.stdout).strip().splitlines()
            results[backend] = {"error": f"exit {child.returncode}: {tail[-1] if tail else ''}"[:300]}
    headers = (f"{b + ' fwd ms':>14} {b + ' f+b ms':>14} {'TFLOP/s':>8} {'diff':>7}" for b in BACKENDS)
    print(f"{'shape':18} {'calls/fwd':>9} " + " ".join(headers))
    for name, (_shape, calls) in SHAPES.items():
        cells = []
        for backend in BACKENDS:
            entry = results[backend].get(name, results[backend])
            if "error" in entry:
                cells.append(f"{'ERR':>14} {'':>14} {'':>8} {'':>7}")
                continue
            cells.append(f"{entry['forward_s'] * 1e3:14.3f} {entry['forward_backward_s'] * 1e3:14.3f} "
                         f"{entry['forward_backward_tflops']:8.0f} {entry['max_rel_diff']:7.1e}")
        print(f"{name:18} {calls:9d} " + " ".join(cells))
    for backend in BACKENDS:
        errors = {k: v["error"] for k, v in results[backend].items() if isinstance(v, dict) and "error" in v}
        if "error" in results[backend]:
            errors = {"all": results[backend]["error"]}
        for name, message in errors.items():
            print(f"{backend} {name}: {message}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
