"""CUDA graphs under PyTorch's cudaMallocAsync allocator (a ComfyUI server's default), on the GPU: does a process
that records its steps with the engine's GraphedSteps (trainer_core/graphs.py) live through a recording that fails?

    python3 bench/async_graphs.py --out "$OUT"

Each case runs in a process of its own with `PYTORCH_CUDA_ALLOC_CONF=backend:cudaMallocAsync`, on a small
stand-in for a training step (a frozen 4096-wide layer stack with a trained low-rank branch, two batch shapes),
for eight steps whose losses are compared with an eager run's, trained on a thread of its own as a ComfyUI server's
prompt worker does (`records-on-the-main-thread` apart):
- `records`: nothing fails; the steps replay.
- `records-on-the-main-thread`: the same on the process's main thread.
- `records-compiled`: the trained branch compiled by torch.compile (Triton kernels, as the engine's compiled
  blocks are).
- `out-of-memory-while-recording`: the recording asks for more than PyTorch's memory fraction allows (the
  simulated cards of bench/realrun.py cap the allocator so), in its backward, after gradients were written.
- `out-of-memory-while-recording-freed`: the same, with what the failed recording made let go as under
  PyTorch's own allocator (GraphedSteps keeps it under cudaMallocAsync): the abort that keeping it avoids.
- `out-of-memory-at-first-replay`: the card's end is physical (the rest of the GPU held from the driver, as
  realrun.py does) and the recorded step needs more than is left only when it first runs.
- `host-read-while-recording`: the step reads a value on the host while it records (CUDA invalidates the
  recording), which the engine's steps never do; swapped steps' recordings failed in a like way (bench/NOTES.md
  §14), which is why they are not recorded under this allocator.
A case's result: its exit status (negative: the signal that ended it, -6 for an abort), whether it trained all
its steps with the eager run's losses, what the engine logged, and the GPU's free memory before the first step
and after the last (what a failed recording held). Written to `<out>/async-graphs.json` and printed; each case's
whole output to `<out>/async-graphs.log`.
"""

import argparse
import ctypes
import json
import logging
import os
import subprocess
import sys
import threading
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CASES = ("records", "records-on-the-main-thread", "records-compiled", "out-of-memory-while-recording",
         "out-of-memory-while-recording-freed", "out-of-memory-at-first-replay", "host-read-while-recording")
WIDTH = 4096
LAYERS = 8
RANK = 64
STEPS = 8
GIB = 1024**3


def run_case(case: str) -> dict:
    """In the case's own process: trains the stand-in eagerly, then through GraphedSteps with the case's failure."""
    import torch

    sys.path.insert(0, str(REPO))
    from trainer_core import graphs

    assert graphs.under_cuda_malloc_async(torch.device("cuda")), "this process must run cudaMallocAsync"
    torch.manual_seed(0)
    device = torch.device("cuda")
    frozen = [torch.randn(WIDTH, WIDTH, device=device, dtype=torch.bfloat16) / WIDTH**0.5 for _ in range(LAYERS)]
    down = torch.nn.Parameter(torch.randn(WIDTH, RANK, device=device) / WIDTH**0.5)
    up = torch.nn.Parameter(torch.zeros(RANK, WIDTH, device=device))
    parameters = [down, up]
    batches = [torch.randn(rows, WIDTH, device=device, dtype=torch.bfloat16) for rows in (2048, 1024) * (STEPS // 2)]
    failing = {"on": False}

    def branch(hidden):
        return (hidden.float() @ down @ up).to(hidden.dtype)

    if case == "records-compiled":
        branch = torch.compile(branch, dynamic=True)

    def forward_backward(x):
        hidden = x
        for weight in frozen:
            hidden = torch.relu(hidden @ weight + branch(hidden))
        loss = hidden.float().pow(2).mean()
        capturing = torch.cuda.is_current_stream_capturing()
        if failing["on"] and capturing and case == "host-read-while-recording":
            loss.item()
        if failing["on"] and capturing and case == "out-of-memory-at-first-replay":
            # Memory the eager step never needed, freed inside the recording: only its first run asks for it.
            extra = torch.empty(failing["bytes"], dtype=torch.uint8, device=device)
            del extra
        loss.backward()
        if failing["on"] and capturing and case.startswith("out-of-memory-while-recording"):
            torch.empty(failing["bytes"], dtype=torch.uint8, device=device)  # past the fraction: raises
        return loss

    def train(graphed: bool) -> list[float]:
        with torch.no_grad():
            up.zero_()
        optimizer = torch.optim.SGD(parameters, lr=1e-2)
        step = graphs.GraphedSteps(parameters, forward_backward, lambda: tuple(w.data_ptr() for w in frozen)) \
            if graphed else forward_backward
        losses = []
        for x in batches:
            optimizer.zero_grad(set_to_none=True)
            loss = step(x)
            optimizer.step()
            losses.append(loss.item())
        if graphed:
            step.release()
        return losses

    eager = train(graphed=False)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    free_before, total = torch.cuda.mem_get_info()
    if case.startswith("out-of-memory-while-recording"):
        in_use = torch.cuda.memory_allocated()
        torch.cuda.set_per_process_memory_fraction(min(1.0, (in_use + 4 * GIB) / total))
        failing["bytes"] = 8 * GIB
        if case.endswith("-freed"):
            graphs.GraphedSteps._keep_where_freeing_fails = lambda self, error: None
    if case == "out-of-memory-at-first-replay":
        # The eager step's peak plus 2 GiB is left on the card; the recording wants 6 GiB more.
        torch.cuda.reset_peak_memory_stats()
        train(graphed=False)
        step_peak = torch.cuda.max_memory_allocated()
        torch.cuda.empty_cache()
        free, _ = torch.cuda.mem_get_info()
        hold = free - (step_peak - torch.cuda.memory_allocated()) - 2 * GIB
        pointer = ctypes.c_uint64()
        status = ctypes.CDLL("libcuda.so.1").cuMemAlloc_v2(ctypes.byref(pointer), ctypes.c_size_t(hold))
        assert status == 0, f"cuMemAlloc: {status}"
        failing["bytes"] = 6 * GIB
    failing["on"] = not case.startswith("records")
    if case == "records-on-the-main-thread":
        graphed = train(graphed=True)
    else:
        outcome = []
        worker = threading.Thread(target=lambda: outcome.append(train(graphed=True)))
        worker.start()
        worker.join()
        if not outcome:
            raise RuntimeError("the training thread failed (its traceback is above)")
        graphed = outcome[0]
    torch.cuda.synchronize()
    free_after, _ = torch.cuda.mem_get_info()
    return {"steps": len(graphed), "losses_equal": graphed == eager, "max_difference": max(
        abs(a - b) for a, b in zip(graphed, eager, strict=True)), "free_before_gib": free_before / GIB,
        "free_after_gib": free_after / GIB, "kept_failed_recordings": len(graphs._FAILED_RECORDINGS)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--case", choices=CASES, help=argparse.SUPPRESS)  # the child's own run
    args = parser.parse_args()
    if args.case:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        print("RESULT " + json.dumps(run_case(args.case)), flush=True)
        return
    results, logs = [], []
    environment = os.environ | {"PYTORCH_CUDA_ALLOC_CONF": "backend:cudaMallocAsync"}
    for case in CASES:
        child = subprocess.run([sys.executable, __file__, "--out", str(args.out), "--case", case], env=environment,
                               capture_output=True, text=True, timeout=300)
        output = child.stdout + child.stderr
        result = next((json.loads(line[len("RESULT "):]) for line in child.stdout.splitlines()
                       if line.startswith("RESULT ")), {})
        logged = [line for line in output.splitlines() if line.startswith(("WARNING", "INFO", "terminate"))
                  or "Error" in line]
        results.append({"case": case, "exit_status": child.returncode, **result, "log": logged[-8:]})
        logs.append(f"==== {case}: exit status {child.returncode}\n{output}")
        print(json.dumps(results[-1])[:600], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "async-graphs.json").write_text(json.dumps(results, indent=1) + "\n")
    (args.out / "async-graphs.log").write_text("\n".join(logs))


if __name__ == "__main__":
    main()
