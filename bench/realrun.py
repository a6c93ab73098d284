"""The run a user starts, measured: `lora-train` and the Train LoRA node in a headless ComfyUI server, with the
product's defaults, on full-size random-weight files in the release layouts, on simulated 8-24 GB cards.

    python bench/realrun.py --model sdxl --card-gb 8 12 [--entry cli|node|both] [--steps 60] [--models DIR]
        [--blocks-to-swap N|auto]

What one call does, in order:
1. Model files (bench/realrun_files.py): the model's files in the release layouts and names, random weights,
   written once into `--models DIR` (ComfyUI's folder layout) by a child process on the GPU, and reused by later
   calls; `--clean-other-models` first deletes the files other models (or weight dtypes) left there.
2. A dataset of ten 1024-px-area JPEGs with captions in three aspect-ratio buckets (1024x1024, 832x1216,
   1216x832).
3. For each simulated card and entry: one training run with the product's defaults (rank 16, AdamW8bit, bf16,
   checkpointing, compile and CUDA graphs on their auto settings, batch 1, 1024² buckets) plus what a user sets:
   `--steps`, a sample prompt previewed every `--sample-every` steps at 1024² (and at the end), a checkpoint
   every `--save-every` steps.
   - cli: `python -m trainer_core train config.yaml` (what `lora-train` runs) in a child process;
   - node: a fresh headless ComfyUI server (its own main.py, the pack loaded as a custom node), and the graph
     Load Base Model -> Dataset + LoRA Config -> Train LoRA queued over HTTP, every input at the default
     /object_info gives except the files, the dataset folder and the settings above.
   A card of C GiB is simulated in that process (bench/realrun_probe.py): PyTorch's allocator is capped at C GiB
   less the process's CUDA context, and `torch.cuda.mem_get_info` reports a card of C GiB (total C, free the
   big card's free memory less what lies beyond C), so ComfyUI's model management sees and offloads as on such
   a card; `--reserve-vram` is its Linux default, 0.4 GiB. (Capping and `--reserve-vram total - C` alone, as
   first tried, left ComfyUI reading the big card's free memory where it places text encoders.)
4. What is recorded per run, from the probe's records in the run's process and nvidia-smi read every 100 ms:
   each step's time (the gap between two step events less the previews and checkpoints between them; a step
   event is sent once its loss is read from the device), its bucket and how many frames torch.compile compiled
   in it; the time to the first step from the start (the command's start; the prompt's queueing for the node);
   the time lost to compiling (each step that compiled, less the steady step time) and every other slow step;
   and per phase (loading, caching, training, sampling, saving) its time and peak memory: allocated and
   reserved by PyTorch's allocator (exact where the phase set a new overall peak; else the largest value a
   20 ms sampler saw, marked ~) and nvidia-smi's memory.used. An out-of-memory error makes the run "did not
   fit" with its message, and the next configuration runs.
5. Output: `<out>/realrun-<model>[-te-<text encoders>]-<cards>-<entry>.json` (every run) and `.md` (a table to
   paste into bench/RESULTS.md, also printed), rewritten after each run; each run's folder under `<work>/runs/`
   holds its config or graph, its process's log, the probe's records and the run's own JSON.

`--dop` runs each configuration twice, without and then with differential output preservation (the trigger
word's captions also trained as "person" captions, held to the base model's prediction: two more forward passes
and a backward per step), and the table's last lines give what it costs per step (steady s/step with DOP less
without, and the ratio).

A call stops starting runs when less than `--min-run-seconds` of `--time-limit` is left (a device command gets
600 s). `--tiny` runs the same code on a small SD3 (real-size CLIP-L and VAE) at 128 px, on the CPU with `--cpu`:
the CPU test's configuration; its numbers mean nothing.
"""

import argparse
import contextlib
import datetime
import json
import logging
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
for folder in (BENCH, REPO):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

import realrun_files  # noqa: E402

from trainer_core.cli import comfyui_version, find_comfyui  # noqa: E402
from trainer_core.config import OPTIMIZERS  # noqa: E402

log = logging.getLogger("realrun")

GIB = 1024**3
# What ComfyUI keeps free on Linux besides --reserve-vram's replacement of it (model_management.EXTRA_RESERVED_VRAM).
COMFY_DEFAULT_RESERVE_GIB = 400 / 1024
# The weights each model trains with by default: the issue's targets (SD3.5 Large and Flux dev in fp8).
DEFAULT_WEIGHTS = {"sdxl": "default", "sd35m": "default", "sd35l": "fp8", "flux": "fp8"}
TRIGGER = "rrbench"
# The class word of --dop's runs.
DOP_CLASS = "person"
SAMPLE_PROMPTS = (f"{TRIGGER}, a photo of a red fox in the snow, soft light",
                  f"{TRIGGER}, a lighthouse on a cliff at dusk")
PHASES = ("loading", "caching", "training", "sampling")
NO_FILE = "(none)"
OOM_MARKERS = ("OutOfMemoryError", "out of memory", "CUDA error: out of memory")
# A step that takes more than this many times the steady step (plus SLOW_MARGIN_S) is listed as slow.
SLOW_FACTOR, SLOW_MARGIN_S = 2.0, 0.1
# Step events queued within this many seconds of each other came from one read of several steps' losses.
SAME_REPORT_S = 0.005
LOG_TAIL_LINES = 40
# What ComfyUI's loaders log for weights a file lacks (they load with strict=False): a file-layout mistake.
LOAD_WARNING = re.compile(r"(clip|unet) missing:|unet unexpected:|Missing VAE keys")


# -- arguments ----------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=realrun_files.MODELS, help="the model to train (not with --tiny)")
    parser.add_argument("--tiny", action="store_true",
                        help="a small SD3 with real-size CLIP-L and VAE at 128 px, to check the bench (with --cpu)")
    parser.add_argument("--cpu", action="store_true", help="run everything on the CPU (with --tiny)")
    parser.add_argument("--card-gb", type=float, nargs="+", default=[8, 12, 16, 24],
                        help="simulated card sizes in GiB, one run per size and entry (default 8 12 16 24)")
    parser.add_argument("--entry", choices=("cli", "node", "both"), default="both",
                        help="lora-train, the Train LoRA node in a ComfyUI server, or both (default)")
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps per run (default 60)")
    parser.add_argument("--warmup", type=int, default=10,
                        help="steps left out of the steady median (default 10: compiles and graph recordings)")
    parser.add_argument("--sample-every", type=int, default=50, help="preview every N steps (default 50)")
    parser.add_argument("--save-every", type=int, default=50, help="checkpoint every N steps (default 50)")
    parser.add_argument("--prompts", type=int, choices=(1, 2), default=1, help="sample prompts per preview")
    parser.add_argument("--text-encoders", choices=("none", "clip", "clip+t5"), default="none",
                        help="also train the text encoders' LoRA (LoRA Config's text_encoders; default none)")
    parser.add_argument("--weights", choices=realrun_files.WEIGHTS,
                        help="diffusion model weights: default (the release's dtype) or fp8 (file and loader in "
                             "float8_e4m3fn); default: fp8 for sd35l and flux, the release's for sdxl and sd35m")
    parser.add_argument("--work", type=Path, default=Path("/tmp/lora-realrun"),
                        help="runs, dataset and compile cache go here (default /tmp/lora-realrun)")
    parser.add_argument("--models", type=Path, help="model files, reused by later calls (default <work>/models)")
    parser.add_argument("--out", type=Path, help="JSON and markdown results (default <work>/results)")
    parser.add_argument("--clean-other-models", action="store_true",
                        help="delete model files this call does not use from --models first (the disk is small)")
    parser.add_argument("--time-limit", type=float, default=540.0,
                        help="seconds after the start past which a run is stopped and none is started")
    parser.add_argument("--min-run-seconds", type=float, default=60.0,
                        help="start no run with less than this left of --time-limit")
    parser.add_argument("--dop", action="store_true",
                        help="run each configuration without and with differential output preservation, to "
                             "measure what it costs per step")
    parser.add_argument("--blocks-to-swap", type=swap_setting, default=None, metavar="N|auto",
                        help="train.blocks_to_swap / the node's blocks_to_swap: N blocks, or auto (default: the "
                             "product's, auto)")
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default=None,
                        help="train.optimizer / the node's optimizer (default: the product's, adamw8bit); to "
                             "measure what the default optimizer costs a step")
    parser.add_argument("--square", action="store_true",
                        help="a dataset of one bucket (square images) instead of three aspect-ratio buckets; to "
                             "measure what the buckets cost")
    parser.add_argument("--disable-cuda-malloc", action="store_true",
                        help="start the node entry's ComfyUI server with --disable-cuda-malloc (PyTorch's native "
                             "allocator instead of cudaMallocAsync, under which the engine records no CUDA graphs); "
                             "to measure what a user gains with the flag")
    parser.add_argument("--child", choices=("generate", "cli", "server"), help=argparse.SUPPRESS)
    parser.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return args
    if args.rest:
        parser.error(f"unrecognized arguments: {' '.join(args.rest)}")
    if args.tiny == bool(args.model):
        parser.error("give --model (sdxl, sd35m, sd35l, flux) or --tiny")
    if args.cpu and not args.tiny:
        parser.error("--cpu runs only --tiny: full-size models need the GPU")
    if args.disable_cuda_malloc and args.entry == "cli":
        parser.error("--disable-cuda-malloc is for the node entry's ComfyUI server: give --entry node or both")
    if not 1 <= args.warmup < args.steps:
        parser.error("need 1 <= --warmup < --steps")
    args.weights = args.weights or DEFAULT_WEIGHTS.get(args.model, "default")
    args.models = args.models or args.work / "models"
    args.out = args.out or args.work / "results"
    return args


# -- children: what runs in the measured processes ----------------------------------------------------------


def run_child(args: argparse.Namespace) -> int:
    rest = args.rest[1:] if args.rest[:1] == ["--"] else args.rest
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s", stream=sys.stderr)
    if args.child == "generate":
        return child_generate(rest)
    import realrun_probe

    realrun_probe.install()
    if args.child == "cli":
        return child_cli(rest)
    return child_server(rest)


def child_generate(rest: list[str]) -> int:
    """Writes the missing model files: `generate MODELS_DIR MODEL WEIGHTS TINY CPU`."""
    models_dir, model, weights, tiny, cpu = Path(rest[0]), rest[1], rest[2], rest[3] == "1", rest[4] == "1"
    sys.path.insert(0, str(REPO))
    from trainer_core.cli import import_comfyui

    import_comfyui(cpu)
    import comfy.model_management

    device = comfy.model_management.get_torch_device()
    files = realrun_files.model_files(model, weights, tiny)
    started = time.monotonic()
    written = realrun_files.write_missing(models_dir, files, device)
    log.info("model files: wrote %d in %.0f s on %s", len(written), time.monotonic() - started, device)
    return 0


def child_cli(rest: list[str]) -> int:
    """`lora-train` as a user runs it; with the simulated card's reserve where the command takes one."""
    sys.path.insert(1, str(REPO))
    from trainer_core import cli

    reserve = os.environ.get("REALRUN_RESERVE_GIB")
    if reserve and _takes_option(cli, rest, "--reserve-vram", reserve):
        rest = [*rest, "--reserve-vram", reserve]
    return cli.main(rest)


def _takes_option(cli, argv: list[str], option: str, value: str) -> bool:
    """Whether this lora-train has `option` (the probe sets ComfyUI's value itself where it has not)."""
    import io

    try:
        with contextlib.redirect_stderr(io.StringIO()):
            cli.parse_arguments([*argv, option, value])
    except SystemExit:
        return False
    return True


def child_server(rest: list[str]) -> int:
    """ComfyUI's main.py in this process (cwd is the host folder), with its command line in `rest`."""
    import runpy

    host = os.getcwd()
    sys.path.insert(0, host)
    sys.argv = ["main.py", *rest]
    runpy.run_path(os.path.join(host, "main.py"), run_name="__main__")
    return 0


# -- the parent: files, runs, readings ----------------------------------------------------------------------


def visible_gpu(environment=os.environ) -> str:
    """The GPU the runs use, as nvidia-smi's `-i` names it: the first of CUDA_VISIBLE_DEVICES (an index or a
    UUID), else 0. nvidia-smi itself ignores CUDA_VISIBLE_DEVICES and lists every GPU of the host, so a run on
    GPU 1 beside another on GPU 0 would read both."""
    visible = environment.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
    return visible or "0"


def gpu_info() -> dict | None:
    """Name, total memory (GiB) and driver of the runs' GPU from nvidia-smi; None where there is none."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        line = subprocess.run(["nvidia-smi", "-i", visible_gpu(), "--query-gpu=name,memory.total,driver_version",
                               "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=30,
                              check=True).stdout.splitlines()[0]
    except (subprocess.SubprocessError, IndexError):
        return None
    name, total_mib, driver = (part.strip() for part in line.split(","))
    return {"name": name, "total_gib": float(total_mib) / 1024, "driver": driver}


class MemoryUsedPoller:
    """nvidia-smi's memory.used of the runs' GPU every 100 ms, stamped with time.monotonic() as read."""

    def __init__(self):
        self.samples: list[tuple[float, float]] = []
        self._process = subprocess.Popen(
            ["nvidia-smi", "-i", visible_gpu(), "--query-gpu=memory.used", "--format=csv,noheader,nounits",
             "-lms", "100"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
        self._thread = threading.Thread(target=self._read, name="nvidia-smi", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        for line in self._process.stdout:
            with contextlib.suppress(ValueError):
                self.samples.append((time.monotonic(), float(line.split(",")[0]) / 1024))

    def stop(self) -> None:
        self._process.terminate()
        try:
            self._process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            # It runs in a session of its own: nothing else would end it.
            self._process.kill()
            self._process.wait()


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.started = time.monotonic()
        self.gpu = None if args.cpu else gpu_info()
        self.files = realrun_files.model_files(args.model, args.weights, args.tiny)
        self.label = "tiny" if args.tiny else args.model
        self.poller: MemoryUsedPoller | None = None
        self.runs: list[dict] = []
        cards = "-".join(f"{c:g}" for c in args.card_gb)
        swap = "" if args.blocks_to_swap is None else f"-swap-{swap_text(args.blocks_to_swap)}"
        text_encoders = "" if args.text_encoders == "none" else f"-te-{args.text_encoders.replace('+', '-')}"
        self.name = (f"realrun-{self.label}{text_encoders}-{cards}gb-{args.entry}" + ("-dop" if args.dop else "")
                     + swap + (f"-{args.optimizer}" if args.optimizer else "") + ("-square" if args.square else "")
                     + ("-native-allocator" if args.disable_cuda_malloc else ""))
        self.header: dict = {}

    def remaining(self) -> float:
        return self.args.time_limit - (time.monotonic() - self.started)

    def child_env(self, probe: Path | None = None, card: float | None = None) -> dict:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        # One compile cache for the call's runs (and later calls on the same machine): the first run compiles
        # cold, later ones find inductor's kernels; each run records which it was.
        env.setdefault("TORCHINDUCTOR_CACHE_DIR", str(self.args.work / "inductor-cache"))
        if probe is not None:
            env["REALRUN_PROBE"] = str(probe)
        if card is not None and self.gpu is not None:
            env["REALRUN_CARD_GIB"] = f"{card:g}"
            env["REALRUN_RESERVE_GIB"] = f"{self.reserve_gib(card):.3f}"
        return env

    def reserve_gib(self, card: float) -> float:
        # The probe makes the process see a card of that size (realrun_probe.report_card_size): ComfyUI keeps its
        # own default free on it, given on the command line as a user would.
        return COMFY_DEFAULT_RESERVE_GIB

    # -- preparation ----------------------------------------------------------------------------------------

    def prepare(self) -> None:
        args = self.args
        models = args.models
        if args.clean_other_models:
            for stale in realrun_files.stale_files(models, self.files):
                log.info("deleting %s (not used by this call)", stale)
                stale.unlink()
        missing = [f for f in self.files.all if not (models / f).is_file()]
        generated = 0.0
        if missing:
            log.info("writing %s into %s", ", ".join(missing), models)
            started = time.monotonic()
            command = [sys.executable, str(BENCH / "realrun.py"), "--child", "generate", "--", str(models),
                       self.label if args.tiny else args.model, args.weights, str(int(args.tiny)), str(int(args.cpu))]
            try:
                subprocess.run(command, cwd=REPO, env=self.child_env(), check=True,
                               timeout=max(60, self.remaining()))
            except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as error:
                sys.exit(f"writing the model files failed ({error}); the child's error is above")
            generated = time.monotonic() - started
        dataset_folder = args.work / ("dataset-tiny" if args.tiny else "dataset-1024")
        if args.square:
            dataset_folder = dataset_folder.with_name(dataset_folder.name + "-square")
        self.dataset = realrun_files.write_dataset(dataset_folder, args.tiny, TRIGGER, args.square)
        self.header = {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "gpu": self.gpu, "model": self.label, "label": realrun_files.LABELS[self.label],
            "weights": args.weights, "files": self.files.all, "files_written": missing,
            "files_written_s": round(generated, 1), "dataset": self.dataset, "steps": args.steps,
            "warmup": args.warmup, "sample_every": args.sample_every, "save_every": args.save_every,
            "prompts": list(SAMPLE_PROMPTS[:args.prompts]), "commit": git_commit(),
            "comfyui": comfyui_version(find_comfyui()), "dop_class": DOP_CLASS,
            "optimizer": args.optimizer or "default",
            "server_cuda_malloc": not args.disable_cuda_malloc,
            "command": " ".join(sys.argv),
        }

    # -- one run --------------------------------------------------------------------------------------------

    def run(self, entry: str, card: float, dop: bool = False) -> dict:
        stamp = datetime.datetime.now().strftime("%H%M%S")
        run_dir = self.args.work / "runs" / f"{self.label}-{entry}{'-dop' if dop else ''}-{card:g}gb-{stamp}"
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / "probe.jsonl"
        cache = Path(self.child_env()["TORCHINDUCTOR_CACHE_DIR"])
        meta = {"model": self.label, "label": realrun_files.LABELS[self.label], "entry": entry, "card_gib": card,
                "dop": dop,
                "simulated": self.gpu is not None, "weights": self.args.weights, "run_dir": str(run_dir),
                "compile_cache_warm": cache.is_dir() and any(cache.iterdir()),
                "blocks_to_swap": None if self.args.blocks_to_swap is None else swap_text(self.args.blocks_to_swap)}
        if self.gpu is not None:
            meta["reserve_vram_gib"] = round(self.reserve_gib(card), 3)
        log.info("%s %s%s on a %g GiB card (%.0f s left)", self.label, entry, " with DOP" if dop else "", card,
                 self.remaining())
        deadline = time.monotonic() + self.remaining()
        env = self.child_env(probe, card)
        if entry == "cli":
            outcome = self.run_cli(run_dir, env, deadline, dop)
        else:
            outcome = self.run_node(run_dir, env, deadline, dop)
        records = read_records(probe)
        smi = self.poller.samples if self.poller else []
        result = summarize(meta | outcome, records, smi, self.args.steps, self.args.warmup)
        (run_dir / "result.json").write_text(json.dumps(result, indent=1))
        log.info("  %s", one_line(result))
        return result

    def run_cli(self, run_dir: Path, env: dict, deadline: float, dop: bool) -> dict:
        config = run_dir / "config.yaml"
        config.write_text(cli_config(self, run_dir, dop))
        command = [sys.executable, str(BENCH / "realrun.py"), "--child", "cli", "--", "train", str(config)]
        if self.args.cpu:
            command.append("--cpu")
        log_path = run_dir / "lora-train.log"
        started = time.monotonic()
        with log_path.open("wb") as log_file:
            process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log_file, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, start_new_session=True)
            timed_out = wait_or_stop(process, deadline)
        text = log_path.read_text(errors="replace")
        outcome = {"run_start": started, "run_end": time.monotonic(), "exit_code": process.returncode,
                   "log": str(log_path), "command": "lora-train " + " ".join(command[5:])}
        if timed_out:
            return outcome | {"status": "timed out", "message": f"stopped at --time-limit; log: {log_path}"}
        if process.returncode == 0:
            return outcome | {"status": "ok"}
        return outcome | failure_of(text)

    def run_node(self, run_dir: Path, env: dict, deadline: float, dop: bool) -> dict:
        server = ComfyServer(run_dir / "server", self.args.models, env, cpu=self.args.cpu,
                             extra_args=("--disable-cuda-malloc",) if self.args.disable_cuda_malloc else ())
        try:
            server.start(deadline)
            graph = node_graph(self, server.object_info(), run_dir, dop)
            (run_dir / "graph.json").write_text(json.dumps(graph, indent=1))
            started = time.monotonic()
            prompt_id = server.queue(graph)
            entry = server.wait(prompt_id, deadline)
            outcome = {"run_start": started, "run_end": time.monotonic(), "server_start_s": server.start_seconds,
                       "log": str(server.log_path)}
            if entry is None:
                return outcome | {"status": "timed out" if time.monotonic() >= deadline else "failed",
                                  "message": server.failure() or f"no result; log: {server.log_path}"}
            return outcome | node_outcome(entry)
        except ServerError as error:
            outcome = {"run_start": time.monotonic(), "run_end": time.monotonic(), "status": "failed",
                       "message": str(error), "log": str(server.log_path)} | failure_of(server.log_text(), str(error))
            if time.monotonic() >= deadline:
                outcome["status"] = "timed out"  # the server had not started when the time ran out
            return outcome
        finally:
            server.stop()

    # -- the whole call -------------------------------------------------------------------------------------

    def main(self) -> int:
        args = self.args
        self.prepare()
        if self.gpu is not None:
            self.poller = MemoryUsedPoller()
        entries = ("cli", "node") if args.entry == "both" else (args.entry,)
        try:
            for card in args.card_gb:
                for entry in entries:
                    for dop in (False, True) if args.dop else (False,):
                        if self.remaining() < args.min_run_seconds:
                            self.runs.append({"model": self.label, "label": realrun_files.LABELS[self.label],
                                              "entry": entry, "card_gib": card, "dop": dop, "status": "not run",
                                              "message": f"under {args.min_run_seconds:g} s of --time-limit left"})
                        else:
                            self.runs.append(self.run(entry, card, dop))
                        self.write()
        finally:
            if self.poller is not None:
                self.poller.stop()
        self.write()
        print(table(self.runs, self.header), flush=True)
        return 0

    def write(self) -> None:
        self.args.out.mkdir(parents=True, exist_ok=True)
        # Each run's own log beside the results: the device keeps nothing of the runs' folders.
        for run in self.runs:
            log = Path(run.get("log") or "")
            if log.is_file():
                shutil.copyfile(log, self.args.out / f"{run['model']}-{run['entry']}-{run['card_gib']:g}gb.log")
        document = {**self.header, "runs": self.runs}
        (self.args.out / f"{self.name}.json").write_text(json.dumps(document, indent=1))
        (self.args.out / f"{self.name}.md").write_text(table(self.runs, self.header) + "\n")


def git_commit() -> str:
    """HEAD, marked "-dirty" where the working tree differs from it: the device tool's copy of the tree carries
    the session's first commit in its git data, so a bare hash there names code that did not run."""
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty"], cwd=REPO, capture_output=True, text=True,
                              timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def wait_or_stop(process: subprocess.Popen, deadline: float) -> bool:
    """Waits for the process until `deadline`; then stops it and its children. Returns whether it was stopped.
    Stopped itself while it waits (Ctrl-C, the device queue's budget), it stops them too: they run in a session
    of their own and would outlive it, holding the GPU."""
    try:
        process.wait(timeout=max(1.0, deadline - time.monotonic()))
        return False
    except subprocess.TimeoutExpired:
        stop_group(process)
        return True
    except BaseException:
        stop_group(process)
        raise


def stop_group(process: subprocess.Popen, first=signal.SIGINT, patience: float = 20.0) -> None:
    """`first` to the process group (SIGINT: Python runs its exit handlers, so the probe closes its records),
    then SIGKILL if it has not ended after `patience` seconds."""
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, first)
    try:
        process.wait(timeout=patience)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def failure_of(log_text: str, message: str = "") -> dict:
    """"did not fit" with the out-of-memory line where the log has one; else "failed" with the last error."""
    lines = [line.strip() for line in log_text.splitlines() if line.strip()]
    oom = [line for line in lines if any(marker in line for marker in OOM_MARKERS)]
    tail = "\n".join(lines[-LOG_TAIL_LINES:])
    if oom:
        return {"status": "did not fit", "message": oom[-1][:500], "log_tail": tail}
    errors = [line for line in lines if line.startswith(("ERROR", "Traceback", "RuntimeError", "Exception"))
              or "Error:" in line]
    return {"status": "failed", "message": message or (errors[-1][:500] if errors else "no error line in the log"),
            "log_tail": tail}


def read_records(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            records.append(json.loads(line))
    return records


# -- the two entries' inputs -----------------------------------------------------------------------------


def swap_setting(text: str) -> int:
    """--blocks-to-swap: a count, or auto (TrainConfig's -1)."""
    if text == "auto":
        return -1
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected a number of blocks or auto, got {text!r}")
    return int(text)


def swap_text(value: int) -> str | int:
    """The YAML's form of a blocks_to_swap value: the count, or "auto"."""
    return "auto" if value == -1 else value


def cli_config(bench: Bench, run_dir: Path, dop: bool = False) -> str:
    """The YAML a user writes for lora-train: files, dataset, steps, previews and checkpoints; the rest default.
    With `dop`, differential output preservation with the class word DOP_CLASS."""
    args, files, models = bench.args, bench.files, bench.args.models
    model = {"name_or_path": str(models / (files.checkpoint or files.diffusion_model)),
             "quantize": args.weights == "fp8"}
    if files.text_encoders:
        model["text_encoder_paths"] = [str(models / f) for f in files.text_encoders]
    if files.vae:
        model["vae_path"] = str(models / files.vae)
    size = 64 if args.tiny else 1024
    config = {
        "name": "realrun", "training_folder": str(run_dir / "output"), "trigger_word": TRIGGER, "model": model,
        "train": {"steps": args.steps} | ({"optimizer": args.optimizer} if args.optimizer else {}) | (
            {"diff_output_preservation": True, "diff_output_preservation_class": DOP_CLASS} if dop else {}) | (
            {} if args.blocks_to_swap is None else {"blocks_to_swap": swap_text(args.blocks_to_swap)}),
        "network": {"text_encoders": args.text_encoders},
        "save": {"save_every": args.save_every},
        "sample": {"sample_every": args.sample_every, "width": size, "height": size,
                   "prompts": list(SAMPLE_PROMPTS[:args.prompts])},
        "datasets": [{"folder_path": bench.dataset["folder"], "resolution": bench.dataset["resolution"]}],
    }
    return json.dumps(config, indent=1)  # JSON is YAML


WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


def defaults_of(info: dict) -> dict:
    """The value each widget input of a node gets when a user adds it to a graph: its default, else (a combo)
    its first choice."""
    values = {}
    for section in ("required", "optional"):
        for name, spec in info["input"].get(section, {}).items():
            kind, options = spec[0], (spec[1] if len(spec) > 1 else {})
            choices = kind if isinstance(kind, list) else options.get("options")
            if "default" in options:
                values[name] = options["default"]
            elif choices:
                values[name] = choices[0]
            elif kind in WIDGET_TYPES and kind != "COMBO":
                values[name] = {"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}[kind]
    return values


def node_graph(bench: Bench, info: dict, run_dir: Path, dop: bool = False) -> dict:
    """Load Base Model -> Dataset + LoRA Config -> Train LoRA in ComfyUI's API format; with `dop`, the Dataset
    preserves the class DOP_CLASS."""
    args, files = bench.args, bench.files

    def name(relative: str) -> str:
        return Path(relative).name if relative else NO_FILE

    encoders = [*files.text_encoders, "", "", ""][:3]
    load = defaults_of(info["LoraTrainer_LoadBaseModel"]) | {
        "checkpoint": name(files.checkpoint), "diffusion_model": name(files.diffusion_model),
        "weight_dtype": realrun_files.LOADER_DTYPE[args.weights], "vae": name(files.vae),
        **{f"text_encoder_{i + 1}": name(e) for i, e in enumerate(encoders)},
    }
    dataset = defaults_of(info["LoraTrainer_Dataset"]) | {
        "folder": bench.dataset["folder"], "resolution": bench.dataset["resolution"], "trigger_word": TRIGGER,
        "preservation_class": DOP_CLASS if dop else ""}
    train = defaults_of(info["LoraTrainer_TrainLoRA"]) | {
        "output_name": f"realrun_{run_dir.name}", "steps": args.steps, "save_every": args.save_every,
        "sample_every": args.sample_every, "sample_prompts": "\n".join(SAMPLE_PROMPTS[:args.prompts]),
        "sample_size": 64 if args.tiny else 1024,
        **({} if args.blocks_to_swap is None else {"blocks_to_swap": args.blocks_to_swap}),
        **({"optimizer": args.optimizer} if args.optimizer else {}),
        "model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "dataset": ["2", 0], "lora_config": ["3", 0],
    }
    return {
        "1": {"class_type": "LoraTrainer_LoadBaseModel", "inputs": load},
        "2": {"class_type": "LoraTrainer_Dataset", "inputs": dataset},
        "3": {"class_type": "LoraTrainer_LoraConfig",
              "inputs": defaults_of(info["LoraTrainer_LoraConfig"]) | {"text_encoders": args.text_encoders}},
        "4": {"class_type": "LoraTrainer_TrainLoRA", "inputs": train},
    }


def node_outcome(entry: dict) -> dict:
    status = entry.get("status", {})
    if status.get("status_str") == "success":
        return {"status": "ok"}
    for event, data in status.get("messages", []):
        if event == "execution_error":
            message = f"{data.get('exception_type', '')}: {data.get('exception_message', '')}".strip()
            fit = any(marker in message for marker in OOM_MARKERS)
            return {"status": "did not fit" if fit else "failed", "message": message[:500],
                    "log_tail": "".join(data.get("traceback", []))[-3000:]}
        if event == "execution_interrupted":
            return {"status": "failed", "message": "interrupted"}
    return {"status": "failed", "message": json.dumps(status)[:500]}


class ServerError(RuntimeError):
    pass


class ComfyServer:
    """A headless ComfyUI (the host the pack finds: COMFYUI_PATH or .comfyui) in a child process, with its own
    input/output/temp/user folders under `root`, the model folders of `models`, and this pack as a custom node."""

    def __init__(self, root: Path, models: Path, env: dict, cpu: bool, extra_args: tuple[str, ...] = ()):
        self.host = find_comfyui()
        self.root, self.models, self.env, self.cpu = root, models, env, cpu
        self.extra_args = extra_args
        self.log_path = root / "server.log"
        self.process: subprocess.Popen | None = None
        self.url = ""
        self.start_seconds = 0.0

    def start(self, deadline: float) -> None:
        dirs = {name: self.root / name for name in ("input", "output", "temp", "user", "frontend")}
        for path in dirs.values():
            path.mkdir(parents=True, exist_ok=True)
        lines = ["realrun:", f"  base_path: {json.dumps(str(self.models))}"]
        lines += [f"  {folder}: {folder}" for folder in realrun_files.MODEL_FOLDERS]
        if not self.pack_in_host():
            custom_nodes = self.root / "custom_nodes"
            custom_nodes.mkdir(exist_ok=True)
            link = custom_nodes / "comfyui-lora-trainer"
            if not link.exists():
                link.symlink_to(REPO, target_is_directory=True)
            lines.append(f"  custom_nodes: {json.dumps(str(custom_nodes))}")
        # The trained LoRA goes where the LoRA Loader looks first: into this run's folder, not the host's.
        lines += ["realrun_run:", f"  base_path: {json.dumps(str(self.root))}", "  is_default: true",
                  "  loras: loras"]
        paths_file = self.root / "extra_model_paths.yaml"
        paths_file.write_text("\n".join(lines) + "\n")
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        command = [
            "--listen", "127.0.0.1", "--port", str(port), "--extra-model-paths-config", str(paths_file),
            *(f"--{name}-directory={dirs[name]}" for name in ("input", "output", "temp", "user")),
            # No browser here: an empty frontend folder, so the server needs no frontend package.
            "--front-end-root", str(dirs["frontend"]), "--database-url", "sqlite:///:memory:", "--disable-api-nodes",
        ]
        if "REALRUN_RESERVE_GIB" in self.env:
            command += ["--reserve-vram", self.env["REALRUN_RESERVE_GIB"]]
        if self.cpu:
            command.append("--cpu")
        command += self.extra_args
        full = [sys.executable, str(BENCH / "realrun.py"), "--child", "server", "--", *command]
        started = time.monotonic()
        with self.log_path.open("wb") as log_file:
            self.process = subprocess.Popen(full, cwd=self.host, env=self.env, stdout=log_file,
                                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            start_new_session=True)
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                self.request("GET", "/system_stats", timeout=5)
                self.start_seconds = time.monotonic() - started
                return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.5)
        raise ServerError(f"ComfyUI did not answer before the time limit; log: {self.log_path}")

    def pack_in_host(self) -> bool:
        """Whether the host's own custom_nodes folder already loads this pack (a second copy would clash)."""
        folder = self.host / "custom_nodes"
        return folder.is_dir() and any(entry.resolve() == REPO for entry in folder.iterdir())

    def request(self, method: str, path: str, body=None, timeout: float = 30.0):
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=timeout) as response:
            payload = response.read()
        return json.loads(payload) if payload.strip() else None

    def check_alive(self) -> None:
        if self.process is not None and self.process.poll() is not None:
            raise ServerError(f"ComfyUI exited with code {self.process.returncode}; log: {self.log_path}")

    def object_info(self) -> dict:
        return {node: self.request("GET", f"/object_info/{node}")[node] for node in
                ("LoraTrainer_LoadBaseModel", "LoraTrainer_Dataset", "LoraTrainer_LoraConfig",
                 "LoraTrainer_TrainLoRA")}

    def queue(self, graph: dict) -> str:
        try:
            answer = self.request("POST", "/prompt", {"prompt": graph, "client_id": "realrun"})
        except urllib.error.HTTPError as error:
            raise ServerError(f"the server refused the graph: {error.read().decode(errors='replace')[:2000]}") from None
        return answer["prompt_id"]

    def wait(self, prompt_id: str, deadline: float) -> dict | None:
        """The prompt's history entry once it has run; None if the server died or the time ran out."""
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return None
            with contextlib.suppress(urllib.error.URLError, ConnectionError, TimeoutError):
                entry = self.request("GET", f"/history/{prompt_id}").get(prompt_id)
                if entry is not None and entry.get("status", {}).get("completed") is not None:
                    return entry
            time.sleep(0.5)
        with contextlib.suppress(urllib.error.URLError, ConnectionError, TimeoutError):
            self.request("POST", "/interrupt", {})
        return None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.is_file() else ""

    def failure(self) -> str:
        found = failure_of(self.log_text())
        return found["message"] if found["status"] == "did not fit" else ""

    def stop(self) -> None:
        if self.process is not None:
            stop_group(self.process)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# -- readings -> results -----------------------------------------------------------------------------------


def summarize(meta: dict, records: list[dict], smi: list[tuple[float, float]], total_steps: int,
              warmup: int) -> dict:
    """One run's results from its probe records and nvidia-smi's readings (see the module docstring)."""
    result = dict(meta)
    setup = next((r for r in records if r["kind"] == "setup"), {})
    result["process"] = {k: v for k, v in setup.items() if k not in ("kind", "t")}
    result["notes"] = [r["text"] for r in records if r["kind"] == "note"]
    segments = [r for r in records if r["kind"] == "segment"]
    events = [r for r in records if r["kind"] == "event"]
    started = next((e for e in events if e["event"] == "started"), None)
    result["compiling"] = started["data"].get("compiling") if started else None
    # What block swap did (the number auto chose): the step events carry it.
    result["blocks_swapped"] = next((e["data"].get("blocks_swapped") for e in events if e["event"] == "step"), None)
    steps = step_times(events, segments, [r for r in records if r["kind"] == "batch"], started)
    result["steps"] = steps
    result["steps_done"] = steps[-1]["step"] if steps else 0
    if result.get("status") == "ok" and result["steps_done"] < total_steps:
        result.update(status="failed", message=f"ended at step {result['steps_done']} of {total_steps}")
    error = next((e for e in events if e["event"] == "error"), None)
    if error and not result.get("message"):
        result["message"] = str(error["data"].get("message", ""))[:500]
    run_start = meta.get("run_start")
    if run_start is not None and meta.get("run_end") is not None:
        result["wall_s"] = round(meta["run_end"] - run_start, 1)
    if steps and run_start is not None:
        result["time_to_first_step_s"] = round(steps[0]["t"] - run_start, 2)
        result["first_step_s"] = steps[0]["seconds"]
    durations = [s["seconds"] for s in steps]
    steady = durations[warmup:] or durations[1:]
    median = statistics.median(steady) if steady else None
    result["steady_s_per_step"] = round(median, 4) if median is not None else None
    result["buckets"] = sorted({s["bucket"] for s in steps if s["bucket"]})
    result["compile"] = compile_losses(steps, median)
    result["phases"] = phase_table(segments, without_held_memory(smi, setup))
    result["samples"] = sum(1 for e in events if e["event"] == "sample")
    result["checkpoints"] = sum(1 for e in events if e["event"] == "saved" and e["data"].get("kind") == "checkpoint")
    # Anything the engine itself reports about memory in its step events (the panel's peak VRAM), as it last said.
    reported = [e["data"] for e in events if e["event"] == "step"]
    result["engine_reported"] = {k: v for k, v in (reported[-1] if reported else {}).items()
                                 if any(word in k for word in ("peak", "vram", "memory"))}
    log_path = meta.get("log")
    if log_path and Path(log_path).is_file():
        lines = Path(log_path).read_text(errors="replace").splitlines()
        result["load_warnings"] = [line.strip()[:300] for line in lines if LOAD_WARNING.search(line)][:5]
    return result


def without_held_memory(smi: list[tuple[float, float]], setup: dict) -> list[tuple[float, float]]:
    """nvidia-smi's readings less what the probe took from the driver to end the simulated card (from the time
    it did, its setup record): the memory a real card of that size would show in use."""
    held = setup.get("held_beyond_card_gib") or 0.0
    return [(t, used - held if t >= setup["t"] else used) for t, used in smi] if held else smi


def step_times(events: list[dict], segments: list[dict], batches: list[dict], started: dict | None) -> list[dict]:
    """Each step's time: the gap from the previous report of losses (or from "started") to its own, less
    previews and checkpoints in between, shared evenly by the steps one report covers; with its bucket (the
    latents the trainer drew for it) and the frames torch.compile compiled in it."""
    step_events = [e for e in events if e["event"] == "step"]
    if not step_events:
        return []
    hooks = [(s["t0"], s["t1"]) for s in segments if s["phase"] in ("sampling", "saving")]
    reports: list[list[dict]] = []
    for event in step_events:
        if reports and event["t"] - reports[-1][-1]["t"] < SAME_REPORT_S:
            reports[-1].append(event)
        else:
            reports.append([event])
    previous_t = started["t"] if started else step_events[0]["t"]
    previous_frames = started.get("frames") if started else None
    steps = []
    for report in reports:
        t = report[-1]["t"]
        hooked = sum(max(0.0, min(b, t) - max(a, previous_t)) for a, b in hooks)
        share = (t - previous_t - hooked) / len(report)
        frames = report[-1].get("frames")
        compiled = frames - previous_frames if frames is not None and previous_frames is not None else None
        for index, event in enumerate(report):
            step = event["data"].get("step")
            batch = batches[step - 1] if step and step <= len(batches) else None
            bucket = f"{batch['shape'][-1] * 8}x{batch['shape'][-2] * 8}" if batch else None
            steps.append({"step": step, "t": event["t"], "seconds": round(share, 4), "bucket": bucket,
                          "compiled_frames": compiled if index == 0 else 0, "between_s": round(hooked, 3)
                          if index == 0 else 0.0})
        previous_t, previous_frames = t, frames if frames is not None else previous_frames
    return steps


def compile_losses(steps: list[dict], median: float | None) -> dict:
    """Time lost to compiling: each step in which torch.compile compiled, less the steady step time (the
    first step counts from "started": model to the GPU, LoRA, compile, graph recording); and the other slow
    steps (a new bucket's first step, a CUDA graph's recording, the step after a preview) with their excess."""
    if median is None:
        return {}
    compiled, slow = [], []
    for step in steps:
        excess = step["seconds"] - median
        entry = {"step": step["step"], "seconds": step["seconds"], "excess_s": round(excess, 3),
                 "bucket": step["bucket"], "frames": step["compiled_frames"]}
        if step["compiled_frames"]:
            compiled.append(entry)
        elif step["seconds"] > SLOW_FACTOR * median + SLOW_MARGIN_S:
            slow.append(entry)
    return {"seconds": round(sum(max(0.0, e["excess_s"]) for e in compiled), 2), "compiling_steps": compiled,
            "recompiles": sum(1 for e in compiled if e["step"] != steps[0]["step"]), "slow_steps": slow,
            "slow_seconds": round(sum(e["excess_s"] for e in slow), 2)}


def phase_table(segments: list[dict], smi: list[tuple[float, float]]) -> dict:
    """Per phase: seconds, peak GiB allocated / reserved by PyTorch (exact where a segment raised the
    overall peak, else the sampler's largest reading: `*_exact` false), nvidia-smi's memory.used, and the
    allocator's retries (each a freeing of its cache and a device-wide synchronisation) and device
    allocations."""
    phases: dict[str, dict] = {}
    for segment in segments:
        phase = phases.setdefault(segment["phase"], {"seconds": 0.0, "segments": 0})
        phase["seconds"] += segment["t1"] - segment["t0"]
        phase["segments"] += 1
        for counter in ("retries", "device_allocs"):
            if f"{counter}_end" in segment:
                phase[f"allocator_{counter}"] = (phase.get(f"allocator_{counter}", 0)
                                                 + segment[f"{counter}_end"] - segment[f"{counter}_start"])
        for kind in ("allocated", "reserved"):
            if not (segment[f"{kind}_peak_end"] or segment[f"{kind}_seen"]):
                continue  # no CUDA in this process
            raised = segment[f"{kind}_peak_end"] > segment[f"{kind}_peak_start"]
            value = (segment[f"{kind}_peak_end"] if raised else segment[f"{kind}_seen"]) / GIB
            if value > phase.get(f"peak_{kind}_gib", -1.0):
                phase[f"peak_{kind}_gib"] = value
                phase[f"peak_{kind}_exact"] = raised
        readings = [used for t, used in smi if segment["t0"] <= t <= segment["t1"]]
        if readings:
            phase["nvidia_smi_peak_gib"] = max(phase.get("nvidia_smi_peak_gib", 0.0), max(readings))
    for phase in phases.values():
        for key, value in phase.items():
            if isinstance(value, float):
                phase[key] = round(value, 3)
    return phases


# -- the report --------------------------------------------------------------------------------------------


def one_line(run: dict) -> str:
    steady = run.get("steady_s_per_step")
    return (f"{run['status']}: {steady if steady is not None else '-'} s/step steady, first step at "
            f"{run.get('time_to_first_step_s', '-')} s, compile {run.get('compile', {}).get('seconds', '-')} s"
            + (f"; {run['message']}" if run.get("message") and run["status"] != "ok" else ""))


def _gib(phase: dict | None, kind: str) -> str:
    if kind == "nvidia_smi":
        value = (phase or {}).get("nvidia_smi_peak_gib")
        return "-" if value is None else f"{value:.1f}"
    value = (phase or {}).get(f"peak_{kind}_gib")
    if value is None:
        return "-"
    return f"{value:.1f}" if phase.get(f"peak_{kind}_exact") else f"~{value:.1f}"


def table(runs: list[dict], header: dict) -> str:
    """The runs as a markdown table: one row per run; peaks as loading / caching / training / sampling."""
    gpu = header.get("gpu") or {}
    lines = [
        f"{header.get('label', '')} ({header.get('weights', '')} weights), {header.get('steps', '')} steps, "
        f"previews every {header.get('sample_every', '')} and checkpoints every {header.get('save_every', '')}, "
        f"{gpu.get('name', 'CPU')}, ComfyUI {header.get('comfyui', '')}, {header.get('date', '')}, "
        f"commit {header.get('commit', '')}; steady = median "
        f"after step {header.get('warmup', '')}; peaks in GiB as loading / caching / training / sampling "
        "(~: sampled every 20 ms, the phase set no new overall peak)",
        "",
        "| model | entry | card | fits | steady s/step | first step at (s) | compile s (steps) | other slow steps s | "
        "peak allocated | peak reserved | nvidia-smi | buckets | run s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        phases = run.get("phases", {})
        peaks = {kind: " / ".join(_gib(phases.get(p), kind) for p in PHASES)
                 for kind in ("allocated", "reserved", "nvidia_smi")}
        compiled = run.get("compile", {})
        fits = {"ok": "yes", "did not fit": "**no** (OOM)"}.get(run["status"], run["status"])
        card = f"{run['card_gib']:g} GB" if run.get("simulated", True) else "CPU"
        entry = run["entry"] + (" + DOP" if run.get("dop") else "")
        setting, swapped = run.get("blocks_to_swap"), run.get("blocks_swapped")
        if setting is not None or swapped:
            # The product's default is auto: a run given no setting shows what auto chose where it swapped.
            card += f", swap {'auto' if setting is None else setting}: {_value(swapped, 'd')}"
        lines.append(
            f"| {run.get('label', run['model'])} | {entry} | {card} | {fits} | "
            f"{_value(run.get('steady_s_per_step'), '.3f')} | {_value(run.get('time_to_first_step_s'), '.1f')} | "
            f"{_value(compiled.get('seconds'), '.1f')} ({len(compiled.get('compiling_steps', []))}) | "
            f"{_value(compiled.get('slow_seconds'), '.1f')} ({len(compiled.get('slow_steps', []))}) | "
            f"{peaks['allocated']} | {peaks['reserved']} | {peaks['nvidia_smi']} | {len(run.get('buckets', []))} | "
            f"{_value(run.get('wall_s'), '.0f')} |")
    lines += dop_costs(runs)
    failures = [r for r in runs if r["status"] != "ok" and r.get("message")]
    if failures:
        lines.append("")
        lines += [f"- {r.get('label', r['model'])} {r['entry']} {r['card_gib']:g} GB: {r['message']}" for r in failures]
    return "\n".join(lines)


def dop_costs(runs: list[dict]) -> list[str]:
    """What differential output preservation costs per step: each run with DOP against the run of the same
    entry and card without it (steady s/step)."""
    without = {(r["entry"], r["card_gib"]): r.get("steady_s_per_step") for r in runs if not r.get("dop")}
    lines = []
    for run in runs:
        plain, with_dop = without.get((run["entry"], run["card_gib"])), run.get("steady_s_per_step")
        if run.get("dop") and plain and with_dop:
            lines.append(f"- DOP, {run['entry']} {run['card_gib']:g} GB: {with_dop:.3f} s/step against {plain:.3f} "
                         f"without: {with_dop - plain:+.3f} s per step ({with_dop / plain:.2f}x)")
    return [""] + lines if lines else []


def _value(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        return run_child(args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
    bench = Bench(args)
    if bench.gpu is None and not args.cpu:
        sys.exit("no GPU found (nvidia-smi); --tiny --cpu runs the bench's code on the CPU")
    return bench.main()


if __name__ == "__main__":
    sys.exit(main())
