"""LoRA training speed and memory on full-size SDXL, SD3.5 Medium/Large and Flux dev, in one run on one GPU:
this pack's engine (`trainer_core.trainer.Trainer`) against ComfyUI's own `TrainLoraNode`, side by side.

What it does, in order (DESIGN.md §7):
- the card's bf16 matmul rate: 8192³ products on random data, device syncs around ten of them, median of seven;
- whether cuDNN's attention backward fails on Flux's, SD3's and SDXL's shapes (DESIGN.md §7 saw it fail on this card's
  image), in a child process so that a CUDA fault cannot end this one (`trainer_core.attention`, the engine's own
  check); ComfyUI's trainer runs under `sdpa_kernel([FLASH_ATTENTION, EFFICIENT_ATTENTION])` (PyTorch's default
  order on Linux starts with those two) unless `--sdpa default`, ours with the kernel order of
  `TrainConfig.attention` (`--attention`, default auto: cuDNN first on Hopper);
- a preflight: our Trainer for two steps on tiny models in the state ComfyUI's loaders leave a model (built
  in inference mode on the CPU, moved to the GPU by the trainer), a path the full-size runs skip;
- per configuration (model × variant), a fresh model of the real architecture built with ComfyUI's classes
  directly on the GPU with random weights (bench/architectures.py), random latents and text conditioning
  of the real shapes, rank 16, bf16, per-block gradient checkpointing, AdamW, 1024²;
- ours: forward FLOPs of the bare backbone (`FlopCounterMode`, one forward at the run's batch size), then
  `Trainer.run` with a CUDA sync in its `on_step` callback; a step's time is the gap between two callbacks.
  Afterwards it counts base weights that received a gradient: any means backward also computed full
  weight gradients (`--freeze-base` freezes them first, as TrainLoraNode does itself);
- theirs: `TrainLoraNode.execute` on another fresh model; its `TrainSampler` reads `loss.item()` (a sync)
  after each forward+backward and steps the optimizer after the loss callback, so the gap between two
  callbacks is one whole step too (timed by swapping in a subclass whose loss callback stamps the clock);
- median step time after the warm-up steps, peak `torch.cuda.max_memory_allocated` (reset before each
  run, weights included), MFU = 3 × forward FLOPs / step time / matmul rate (checkpointing recomputes the
  forward, so a step does about three forwards of work).

A failing configuration (out of memory, say) is reported in the table and the run goes on. `--smoke` runs
the same code on the CPU with tiny models at 64², to check the script anywhere.
"""

import argparse
import contextlib
import datetime
import functools
import gc
import itertools
import json
import math
import statistics
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GIB = 1024**3
LORA_RANK = 16
LEARNING_RATE = 1e-4
DATASET_SIZE = 4  # samples per run; batches of 4 take all of them


def import_host(cpu: bool) -> Path:
    """Starts ComfyUI (COMFYUI_PATH or .comfyui/) as a library the way the command line does."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from trainer_core.cli import import_comfyui

    host = import_comfyui(cpu)
    import comfy.utils

    comfy.utils.PROGRESS_BAR_ENABLED = False  # TrainLoraNode's tqdm bar would flood the log
    return host


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="sdxl,sd35m,sd35l,flux", help="comma list of sdxl, sd35m, sd35l, flux")
    parser.add_argument("--variants", default="bf16,fp8,bs4",
                        help="comma list: bf16 (bs1), fp8 (fp8 weights, AdamW8bit in ours), bs4 (batch 4)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 8; smoke 3)")
    parser.add_argument("--warmup", type=int, default=None, help="steps left out of the median (default 3; smoke 1)")
    parser.add_argument("--resolution", type=int, default=None, help="image side in pixels (default 1024; smoke 64)")
    parser.add_argument("--skip-baseline", action="store_true", help="do not run ComfyUI's TrainLoraNode")
    parser.add_argument("--sdpa", choices=("flash-efficient", "default"), default="flash-efficient",
                        help="theirs: attention kernels allowed while training (default: flash and memory-efficient)")
    parser.add_argument("--time-limit", type=float, default=480.0,
                        help="seconds after which no new run starts (a device command gets 600 in all)")
    parser.add_argument("--freeze-base", action="store_true",
                        help="set requires_grad=False on the base weights before our Trainer gets the model "
                             "(ComfyUI's loaders leave it True; TrainLoraNode freezes them itself)")
    parser.add_argument("--json", type=Path, help="write all results here (rewritten after every configuration)")
    parser.add_argument("--smoke", action="store_true", help="tiny models on the CPU at 64², to check the script")
    parser.add_argument("--attention", choices=("auto", "flash", "cudnn"), default="auto",
                        help="ours: TrainConfig.attention, the SDPA kernel tried first (auto: cuDNN on Hopper)")
    parser.add_argument("--cuda-graphs", choices=("auto", "off"), default="auto",
                        help="ours: TrainConfig.cuda_graphs (auto: a step's forward and backward replayed as a graph)")
    parser.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                        help="ours: TrainConfig.compile_blocks (the engine's default, auto, compiles SD3 and "
                             "Flux blocks on a GPU)")
    parser.add_argument("--blocks-to-swap", type=int, default=0, metavar="N",
                        help="ours: TrainConfig.blocks_to_swap (-1: auto); the model is then built in host memory "
                             "and loaded by the trainer, so that the swapped blocks stay off the card")
    parser.add_argument("--algorithm", default="lora",
                        help="ours: comma list of lora, loha, lokr, dora (LoraConfig.algorithm), one row each; "
                             "ComfyUI's TrainLoraNode runs once per model and variant, with LoRA")
    parser.add_argument("--ema-decay", type=float, default=0.0,
                        help="keep an EMA of the LoRA weights with this decay (TrainConfig.ema_decay; 0: off)")
    parser.add_argument("--loraplus-lr-ratio", type=float, default=1.0,
                        help="LoRA+: the up matrices' learning-rate ratio (TrainConfig.loraplus_lr_ratio; 1: off)")
    parser.add_argument("--profile", type=Path, help="profile two steps of ours after the warm-up; tables go here")
    args = parser.parse_args(argv)
    defaults = (3, 1, 64) if args.smoke else (8, 3, 1024)
    for name, value in zip(("steps", "warmup", "resolution"), defaults, strict=True):
        if getattr(args, name) is None:
            setattr(args, name, value)
    if not 1 <= args.warmup < args.steps:
        parser.error("need 1 <= --warmup < --steps: the first step's time includes setup")
    return args


def synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_rate(device, size: int, repeats: int = 7, per_repeat: int = 10) -> float:
    """bf16 FLOP/s of size³ matrix products on random data, median over `repeats` timings."""
    import torch

    a, b = (torch.randn(size, size, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        for _ in range(per_repeat):
            a @ b
        synchronize(device)
        times.append((time.perf_counter() - start) / per_repeat)
    return 2 * size**3 / statistics.median(times)


class StepClock:
    """Stamps the end of every step (after a device sync) into `result["step_times"]` as the gap to the
    previous stamp: the first step, which includes setup, has no time."""

    def __init__(self, device, label: str, steps: int, result: dict):
        self.device, self.label, self.steps = device, label, steps
        self.stamps: list[float] = []
        self.gaps = result.setdefault("step_times", [])

    def tick(self, loss: float) -> None:
        synchronize(self.device)
        self.stamps.append(time.perf_counter())
        if len(self.stamps) > 1:
            self.gaps.append(self.stamps[-1] - self.stamps[-2])
        gap = self.gaps[-1] if len(self.stamps) > 1 else math.nan
        print(f"      {self.label} {len(self.stamps)}/{self.steps}  {gap:7.3f} s  loss {loss:.4f}", flush=True)


@contextlib.contextmanager
def peak_memory(device, result: dict):
    """Peak GiB allocated on the device within the block (weights included) into `result`, also on error."""
    import torch

    if device.type != "cuda":
        yield
        return
    torch.cuda.reset_peak_memory_stats(device)
    try:
        yield
    finally:
        result["peak_gib"] = torch.cuda.max_memory_allocated(device) / GIB


def forward_flops(family, samples, batch_size: int, device) -> float:
    """FLOPs of one forward of the bare backbone (no LoRA yet) on a batch, as the trainer calls it."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    batch = samples[:batch_size]
    latents = torch.stack([s.latents for s in batch]).to(device)
    conditioning = {k: torch.stack([s.conditioning[k] for s in batch]).to(device) for k in batch[0].conditioning}
    timesteps = family.sample_timesteps(latents, torch.Generator(device).manual_seed(0))
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16), counter:
        family.predict(latents, timesteps, conditioning)
    return float(counter.get_total_flops())


def run_ours(arch, variant, args, device, result: dict, algorithm: str = "lora") -> None:
    import torch
    from architectures import build, random_dataset

    from trainer_core.config import LoraConfig, TrainConfig
    from trainer_core.families import family_for
    from trainer_core.trainer import Sample, Trainer

    if args.blocks_to_swap:
        # Built in host memory (slower to fill with random weights), as ComfyUI's loaders leave a model.
        patcher = build(arch, variant.weight_dtype, torch.device("cpu"), check_detection=not args.smoke,
                        load_device=device)
    else:
        patcher = build(arch, variant.weight_dtype, device, check_detection=not args.smoke)
    config = TrainConfig(
        steps=args.steps, learning_rate=LEARNING_RATE, batch_size=variant.batch_size, optimizer=variant.optimizer,
        precision="bf16", gradient_checkpointing=True, compile_blocks=args.compile, attention=args.attention,
        cuda_graphs=args.cuda_graphs, blocks_to_swap=args.blocks_to_swap, ema_decay=args.ema_decay,
        loraplus_lr_ratio=args.loraplus_lr_ratio,
    )
    family = family_for(patcher.model, config)
    latents, texts = random_dataset(arch, max(DATASET_SIZE, variant.batch_size), args.resolution)
    samples = [
        Sample(latent, family.conditioning(text.cond, text.pooled, args.resolution, args.resolution), key=str(i))
        for i, (latent, text) in enumerate(zip(latents, texts, strict=True))
    ]
    if args.freeze_base:
        patcher.model.diffusion_model.requires_grad_(False)
    trainer = Trainer(patcher, samples, LoraConfig(rank=LORA_RANK, alpha=LORA_RANK, algorithm=algorithm), config)
    if args.blocks_to_swap:
        # The model is in host memory until the trainer loads it: a bare forward here would run on the CPU.
        print("      forward FLOPs not counted (block swap)", flush=True)
    else:
        result["forward_flops"] = forward_flops(trainer.family, samples, variant.batch_size, device)
        print(f"      forward {result['forward_flops'] / 1e12:.3g} TFLOP at batch {variant.batch_size}", flush=True)
    result["blocks_swapped_setting"] = args.blocks_to_swap
    clock = StepClock(device, "ours", args.steps, result)
    profiler = profile_steps(args, device)

    def on_step(_trainer, reports):
        clock.tick(reports[-1].loss if reports else math.nan)
        profiler.step()

    # As ComfyUI runs a node: inside inference mode, which the trainer must leave by itself.
    with peak_memory(device, result), torch.inference_mode(), profiler:
        trainer.run(on_step)
    if args.profile:
        write_profile(profiler, args.profile / f"{arch.key}-{variant.key}.txt", result)
    result["blocks_swapped"] = trainer.blocks_swapped
    # Only the LoRA should get gradients: a base weight with one means backward did a full weight-gradient pass.
    result["base_weights_with_grad"] = sum(p.grad is not None for p in patcher.model.diffusion_model.parameters())
    if result["base_weights_with_grad"]:
        print(f"      warning: {result['base_weights_with_grad']} base weights received gradients", flush=True)


def profile_steps(args, device):
    """A profiler recording the two steps after the warm-up (a no-op one without --profile)."""
    import torch

    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    schedule = torch.profiler.schedule(wait=max(0, args.warmup - 1), warmup=1, active=2, repeat=1)
    return torch.profiler.profile(activities=activities, schedule=schedule) if args.profile else _NoProfiler()


class _NoProfiler(contextlib.nullcontext):
    def step(self) -> None:
        pass


def write_profile(profiler, path: Path, result: dict) -> None:
    """Top kernels by device time, and device-busy time per step against the step's wall time."""
    import torch

    events = profiler.key_averages()
    # Kernels only, as the profiler's own "Self CUDA time total" counts them: the operator rows (and
    # the ProfilerStep rows) repeat their kernels' time.
    busy = sum(e.self_device_time_total for e in events
               if e.device_type == torch.autograd.DeviceType.CUDA and not e.is_user_annotation) / 2 / 1e6
    result["device_busy_s_per_step"] = busy
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(events.table(sort_by="self_device_time_total", row_limit=40, max_name_column_width=70)
                    + "\n\n" + events.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=70))
    print(f"      device busy {busy:.3f} s per step; profile in {path}", flush=True)


def run_theirs(arch, variant, args, device, result: dict) -> None:
    import comfy_extras.nodes_train as nodes_train
    import torch
    from architectures import build, random_dataset

    patcher = build(arch, variant.weight_dtype, device, check_detection=not args.smoke)
    # ComfyUI 0.33's node trains a copy that the model's loader makes again (`clone(force_deepcopy=True)` calls
    # `cached_patcher_init`, which its core loaders set); the bench's loader hands back the model it built, so
    # the node trains it as on 0.3.75 and holds no second copy.
    patcher.cached_patcher_init = (lambda disable_dynamic=False: patcher, ())
    latents, texts = random_dataset(arch, max(DATASET_SIZE, variant.batch_size), args.resolution)
    size = {"width": args.resolution, "height": args.resolution}
    positive = [[text.cond, {"pooled_output": text.pooled, **size}] for text in texts]
    clock = StepClock(device, "theirs", args.steps, result)

    class TimedTrainSampler(nodes_train.TrainSampler):
        def __init__(self, *a, loss_callback=None, **kw):
            def stamped(loss):
                clock.tick(loss)
                if loss_callback is not None:
                    loss_callback(loss)

            super().__init__(*a, loss_callback=stamped, **kw)

    # The node's inputs are lists (is_input_list); its own defaults where this pack has no equivalent
    # (LoRA weights in bf16, LoRA on every weight, alpha 1), also for inputs newer hosts added (0.33:
    # offloading, bucket_mode, checkpoint_depth, ...).
    defaults = {i.id: [i.default] for i in nodes_train.TrainLoraNode.define_schema().inputs
                if getattr(i, "default", None) is not None}
    inputs = defaults | {
        # One latent dict and one conditioning list per sample: with a single batched dict the node fails
        # (it never sets `multi_res` on that path in 0.3.75).
        "model": [patcher], "latents": [{"samples": latent[None]} for latent in latents],
        "positive": [[cond] for cond in positive],
        "batch_size": [variant.batch_size], "steps": [args.steps], "grad_accumulation_steps": [1],
        "learning_rate": [LEARNING_RATE], "rank": [LORA_RANK], "optimizer": ["AdamW"], "loss_function": ["MSE"],
        "seed": [0], "training_dtype": ["bf16"], "lora_dtype": ["bf16"], "algorithm": ["LoRA"],
        "gradient_checkpointing": [True], "existing_lora": ["[None]"],
    }
    original = nodes_train.TrainSampler
    nodes_train.TrainSampler = TimedTrainSampler
    try:
        with peak_memory(device, result), torch.inference_mode():
            nodes_train.TrainLoraNode.execute(**inputs)
    finally:
        nodes_train.TrainSampler = original


def preflight(device) -> dict[str, str]:
    """Our Trainer, two steps, on tiny models in the state ComfyUI's loaders leave a model: built inside
    inference mode on the CPU (the offload device), bf16, moved to the GPU by the trainer's own load.
    The full-size runs build on the GPU outside inference mode and so never take this path."""
    from architectures import SMOKE

    outcomes = {}
    for key in ("sdxl", "sd35m", "flux"):
        try:
            train_as_loaded(SMOKE[key], device)
            outcomes[key] = "ok"
        except Exception as error:  # noqa: BLE001 - reported, and the benchmark goes on
            print(traceback.format_exc(limit=-6), flush=True)
            first_line = (str(error).strip().splitlines() or [""])[0]
            outcomes[key] = f"FAILED: {type(error).__name__}: {first_line}"[:200]
        release(device)
    return outcomes


def train_as_loaded(arch, device) -> None:
    import torch
    from architectures import build, random_dataset

    from trainer_core.config import LoraConfig, TrainConfig
    from trainer_core.families import family_for
    from trainer_core.trainer import Sample, Trainer

    config = TrainConfig(steps=2, precision="bf16", gradient_checkpointing=True)
    # Loader nodes and the encoders feeding the train node run in inference mode too.
    with torch.inference_mode():
        patcher = build(arch, torch.bfloat16, torch.device("cpu"), check_detection=False, load_device=device)
        family = family_for(patcher.model, config)
        latents, texts = random_dataset(arch, 2, 64)
        samples = [Sample(latent, family.conditioning(text.cond, text.pooled, 64, 64))
                   for latent, text in zip(latents, texts, strict=True)]
    trainer = Trainer(patcher, samples, LoraConfig(rank=4, alpha=4), config)
    with torch.inference_mode():
        trainer.run()


def release(device) -> float:
    """Drops every model ComfyUI still tracks and returns the cache; returns GiB still allocated."""
    import comfy.model_management
    import torch

    comfy.model_management.unload_all_models()
    gc.collect()
    comfy.model_management.cleanup_models()
    comfy.model_management.soft_empty_cache()
    return torch.cuda.memory_allocated(device) / GIB if device.type == "cuda" else 0.0


def attempt(run, arch, variant, args, device) -> dict:
    """One measured run; an exception (out of memory, say) becomes the result's error, next to what was
    measured before it. The median leaves out the first `warmup` steps."""
    result: dict = {}
    try:
        run(arch, variant, args, device, result)
    except Exception as error:  # noqa: BLE001 - any failure is a result to report, then the next run
        print(traceback.format_exc(limit=-6), flush=True)  # the innermost frames say where
        first_line = (str(error).strip().splitlines() or [""])[0]
        result["error"] = f"{type(error).__name__}: {first_line}"[:200]
    timed = result.get("step_times", [])[args.warmup - 1:]
    if timed and "error" not in result:
        result["median_s"] = statistics.median(timed)
    return result


def fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def percent(value) -> str:
    return "-" if value is None else f"{value:.1f}%"


def print_table(rows: list[dict], rate: float) -> None:
    header = (f"{'model':<13} {'variant':<7} {'algo':<5} {'ours s/step':>11} {'GiB':>6} {'MFU':>6} "
              f"{'theirs s/step':>13} {'GiB':>6} {'MFU':>6} {'ours/theirs':>11}  fwd TFLOP")
    print("\n" + header)
    print("-" * len(header))
    notes = []
    for row in rows:
        ours, theirs = row.get("ours", {}), row.get("theirs", {})
        flops = ours.get("forward_flops")

        def mfu(result, flops=flops):
            if flops is None or "median_s" not in result:
                return None
            return 3 * flops / result["median_s"] / rate * 100

        ratio = ours["median_s"] / theirs["median_s"] if "median_s" in ours and "median_s" in theirs else None
        print(f"{row['label']:<13} {row['variant']:<7} {row['algorithm']:<5} "
              f"{fmt(ours.get('median_s'), '11.3f', 'ERR'):>11} "
              f"{fmt(ours.get('peak_gib'), '6.1f'):>6} {percent(mfu(ours)):>6} "
              f"{fmt(theirs.get('median_s'), '13.3f', 'ERR' if 'error' in theirs else '-'):>13} "
              f"{fmt(theirs.get('peak_gib'), '6.1f'):>6} {percent(mfu(theirs)):>6} "
              f"{fmt(ratio, '11.2f'):>11}  {fmt(flops and flops / 1e12, '.3g')}")
        for side, result in (("ours", ours), ("theirs", theirs)):
            if "error" in result:
                notes.append(f"  {row['label']} {row['variant']} {side}: {result['error']}")
        if ours.get("base_weights_with_grad"):
            notes.append(f"  {row['label']} {row['variant']} ours: {ours['base_weights_with_grad']} base weights "
                         "received gradients (the engine left them trainable)")
    if notes:
        print("notes:\n" + "\n".join(notes))


def main(argv=None) -> int:
    args = parse_args(argv)
    host = import_host(cpu=args.smoke)
    import architectures
    import comfy.model_management
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from trainer_core.attention import cudnn_attention_fault, kernel_order
    from trainer_core.config import ALGORITHMS

    device = comfy.model_management.get_torch_device()
    if not args.smoke and device.type != "cuda":
        sys.exit(f"no GPU (ComfyUI picked {device}); use --smoke to run on the CPU")
    archs = architectures.SMOKE if args.smoke else architectures.FULL
    models = args.models.split(",")
    variants = args.variants.split(",")
    unknown = sorted(set(models) - set(archs)) + sorted(set(variants) - set(architectures.VARIANTS))
    if unknown:
        sys.exit(f"unknown model or variant: {', '.join(unknown)}")
    plan = [(m, v) for m, v in architectures.PLAN if m in models and v in variants]
    algorithms = args.algorithm.split(",")
    if set(algorithms) - set(ALGORITHMS):
        sys.exit(f"unknown algorithm: {', '.join(sorted(set(algorithms) - set(ALGORITHMS)))}")

    started = time.perf_counter()
    rate = matmul_rate(device, 256 if args.smoke else 8192)
    from trainer_core.cli import comfyui_version

    version = comfyui_version(host)
    header = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
        "comfyui": version, "matmul_tflops": rate / 1e12, "args": {k: str(v) for k, v in vars(args).items()},
    }
    print(f"{header['device']}, torch {header['torch']} (CUDA {header['cuda']}), ComfyUI {version}; "
          f"bf16 matmul {rate / 1e12:.0f} TFLOP/s; {args.resolution}², {args.steps} steps, "
          f"median of the last {args.steps - args.warmup}; sdpa: theirs {args.sdpa}, ours "
          f"{', '.join(k.name for k in kernel_order(args.attention, device))}", flush=True)

    def guard():
        if args.sdpa == "default":
            return contextlib.nullcontext()
        return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION])

    if device.type == "cuda":
        header["cudnn_sdpa_backward_flux_shape"] = cudnn_attention_fault(device) or "ok (backward ran)"
        print(f"cuDNN attention backward on the families' shapes: {header['cudnn_sdpa_backward_flux_shape']}",
              flush=True)
    with guard():
        header["preflight_loader_state"] = preflight(device)
    print("preflight, our Trainer on tiny models as ComfyUI's loaders leave them: "
          + ", ".join(f"{k} {v}" for k, v in header["preflight_loader_state"].items()), flush=True)

    rows = []
    for (model_key, variant_key), algorithm in itertools.product(plan, algorithms):
        arch, variant = archs[model_key], architectures.VARIANTS[variant_key]
        row = {"model": model_key, "label": arch.label, "variant": variant_key, "algorithm": algorithm}
        rows.append(row)
        # The baseline (ComfyUI's LoRA) once per model and variant, beside the first algorithm's row.
        baseline = not args.skip_baseline and algorithm == algorithms[0]
        runs = [("ours", functools.partial(run_ours, algorithm=algorithm))] + ([("theirs", run_theirs)] if baseline
                                                                              else [])
        for side, run in runs:
            elapsed = time.perf_counter() - started
            if elapsed > args.time_limit:
                row[side] = {"error": f"skipped: {elapsed:.0f} s past, over --time-limit"}
                continue
            print(f"  {arch.label} {variant_key} {algorithm} {side} (t={elapsed:.0f} s)", flush=True)
            with guard():
                row[side] = attempt(run, arch, variant, args, device)
            left = release(device)
            if left > 0.5:
                print(f"      warning: {left:.1f} GiB still allocated after freeing the model", flush=True)
        if args.json:
            args.json.write_text(json.dumps({"header": header, "rows": rows}, indent=1))

    if args.json:
        args.json.write_text(json.dumps({"header": header, "rows": rows}, indent=1))
    print_table(rows, rate)
    print(f"total {time.perf_counter() - started:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
