"""Measurement inside a real run's process (`lora-train`, or a ComfyUI server): the simulated card, the phases
of the run with their peak memory, and the run's events with the time each was sent. Bench code only: the
product never imports it.

`install()` runs first in the process, before ComfyUI is imported, and hooks the imports that matter:
- `torch.cuda.memory`: `mem_get_info` is made to report the simulated card (its size as the total, the free
  memory within it), as ComfyUI reads it when `comfy.model_management` is imported and at every placement
  decision;
- `comfy.cli_args`: ComfyUI's `--reserve-vram` is set when the command line did not set it;
- `comfy.model_management` (which starts CUDA): PyTorch's allocator is capped at the simulated card's size
  less what this process already holds outside the allocator (its CUDA context, as on a real card), with
  `torch.cuda.set_per_process_memory_fraction`; the rest of the GPU is taken from the driver, so that the
  card's end is physical for cudaMallocAsync's pool too; and a thread starts sampling the allocator's
  current memory;
- the pack's engine modules, wherever they are imported from (`trainer_core.X` for the command line,
  `<pack folder>.trainer_core.X` in a ComfyUI server): its loading, dataset caching, prompt encoding,
  training, sampling and saving functions are wrapped to mark phases, and each event a TrainingJob sends is
  recorded with its time. A wrapper that finds nothing to wrap records that it did not, and the run goes on.

Records go to the JSON-lines file named by REALRUN_PROBE, one per line, with `time.monotonic()` stamps
(one clock for every process of the machine, so the bench lines them up with nvidia-smi's readings):
- {"kind": "setup", ...}: the card, cap, context, ComfyUI's reserve and memory state, the allocator backend;
- {"kind": "segment", "phase", "t0", "t1", peaks, counters}: a stretch of time in one phase (phases nest:
  sampling inside training), with the allocator's retry and device-allocation counts at its start and end,
  and the allocator's peaks: `max_memory_allocated`/`_reserved` at its start and end
  (a peak reached in this segment shows as an increase, and is then exact), and the largest current values
  the sampling thread saw (a lower bound of the segment's peak where it set no new overall peak). The probe
  never resets the peak counters; the engine does when a run starts (the peak VRAM it shows is the run's),
  and the probe closes the segment there and opens a new one, so that no segment straddles a reset;
- {"kind": "event", "event", "t", "data", "frames"}: an event the TrainingJob queued (scalar data only) and
  how many frames torch.compile had compiled by then;
- {"kind": "batch", "t", "shape"}: the latents' shape of each batch the trainer drew (its bucket);
- {"kind": "note", "text"}: what could not be hooked.
"""

import contextlib
import functools
import importlib.abc
import importlib.machinery
import json
import os
import sys
import threading
import time
from pathlib import Path

GIB = 1024**3
SAMPLE_SECONDS = 0.02
ENGINE = "trainer_core"


class Probe:
    def __init__(self, path: str, card_gib: float | None, reserve_gib: float | None):
        self.path = path
        self.card_gib = card_gib
        self.reserve_gib = reserve_gib
        self.cuda = False
        self.held_beyond_card = 0  # bytes taken from the driver so that the card's size is also physical
        self._lock = threading.Lock()
        self._file = open(path, "a", buffering=1)  # noqa: SIM115 - open for the process's life
        self._stack: list[str] = []
        self._phases_seen = False  # before the first phase: "startup"; between phases later: "setup"
        self._segment = self._new_segment()

    # -- records ------------------------------------------------------------------------------

    def record(self, kind: str, **fields) -> None:
        line = json.dumps({"kind": kind, **fields}, default=str)
        with self._lock:
            self._file.write(line + "\n")

    def note(self, text: str) -> None:
        self.record("note", t=time.monotonic(), text=text)

    # -- phases -------------------------------------------------------------------------------

    def _memory(self) -> tuple[int, int, int, int]:
        """(allocated now, reserved now, allocated peak, reserved peak) in bytes; zeros without CUDA."""
        if not self.cuda:
            return 0, 0, 0, 0
        import torch

        stats = torch.cuda.memory_stats()
        return (stats.get("allocated_bytes.all.current", 0), stats.get("reserved_bytes.all.current", 0),
                stats.get("allocated_bytes.all.peak", 0), stats.get("reserved_bytes.all.peak", 0))

    def _allocator_counters(self) -> dict:
        """How often the allocator has run out of its cache and freed it to retry (each time a device-wide
        synchronisation), and how often it asked the driver for memory: the cost of running at the card's
        limit. Zeros without CUDA, and where the allocator backend keeps no such count (cudaMallocAsync)."""
        if not self.cuda:
            return {"retries": 0, "device_allocs": 0}
        import torch

        stats = torch.cuda.memory_stats()
        return {"retries": stats.get("num_alloc_retries", 0), "device_allocs": stats.get("num_device_alloc", 0)}

    def _new_segment(self) -> dict:
        phase = self._stack[-1] if self._stack else ("setup" if self._phases_seen else "startup")
        allocated, reserved, allocated_peak, reserved_peak = self._memory()
        counters = {f"{name}_start": value for name, value in self._allocator_counters().items()}
        return {"phase": phase, "t0": time.monotonic(), "allocated_peak_start": allocated_peak,
                "reserved_peak_start": reserved_peak, "allocated_seen": allocated, "reserved_seen": reserved,
                **counters}

    @contextlib.contextmanager
    def phase(self, name: str):
        with self._lock:
            self._close_segment_locked()
            self._stack.append(name)
            self._phases_seen = True
            self._segment = self._new_segment()
        try:
            yield
        finally:
            with self._lock:
                self._close_segment_locked()
                self._stack.pop()
                self._segment = self._new_segment()

    def _close_segment_locked(self) -> None:
        # record() takes the lock itself: write the line directly here.
        segment = self._segment
        allocated, reserved, allocated_peak, reserved_peak = self._memory()
        segment.update(t1=time.monotonic(), allocated_peak_end=allocated_peak, reserved_peak_end=reserved_peak,
                       allocated_seen=max(segment["allocated_seen"], allocated),
                       reserved_seen=max(segment["reserved_seen"], reserved),
                       **{f"{name}_end": value for name, value in self._allocator_counters().items()})
        self._file.write(json.dumps({"kind": "segment", **segment}) + "\n")

    def finish(self) -> None:
        with self._lock:
            self._close_segment_locked()
            self._segment = self._new_segment()

    def _sample_memory(self) -> None:
        while True:
            time.sleep(SAMPLE_SECONDS)
            allocated, reserved, _, _ = self._memory()
            with self._lock:
                segment = self._segment
                segment["allocated_seen"] = max(segment["allocated_seen"], allocated)
                segment["reserved_seen"] = max(segment["reserved_seen"], reserved)

    # -- the simulated card -------------------------------------------------------------------

    def set_reserve(self, cli_args_module) -> None:
        args = cli_args_module.args
        if self.reserve_gib is not None and args.reserve_vram is None:
            args.reserve_vram = self.reserve_gib

    def report_card_size(self, cuda_memory_module) -> None:
        """Makes `torch.cuda.mem_get_info` answer as the simulated card would: its size as the total, and the
        big card's free memory less what lies beyond the simulated card as free. ComfyUI reads both, for its
        total VRAM when `comfy.model_management` is imported and for every placement decision after (where a
        text encoder is built, how much of a model to load); capping the allocator alone leaves it seeing
        the big card's free memory, and it then builds a 9 GB T5 on an "8 GB" card. Patched where it is defined,
        as `torch.cuda.memory` is imported (torch.cuda then takes the name from it), so torch is imported no
        earlier than the process would import it (a ComfyUI server picks its allocator before)."""
        real = cuda_memory_module.mem_get_info
        card = int(self.card_gib * GIB)

        def simulated(device=None):
            free, total = real(device)
            # What the process holds beyond the card (cap_allocator) is already missing from the free memory.
            return max(0, free - max(0, total - card - self.held_beyond_card)), min(total, card)

        self._real_mem_get_info = real
        cuda_memory_module.mem_get_info = simulated

    def cap_allocator(self, model_management) -> None:
        import torch

        device = model_management.get_torch_device()
        setup = {"t": time.monotonic(), "device": str(device), "card_gib": self.card_gib}
        if getattr(device, "type", "") == "cuda":
            self.cuda = True
            free, total = getattr(self, "_real_mem_get_info", torch.cuda.mem_get_info)(device)
            # What this process holds outside PyTorch's allocator now (its CUDA context): a real card holds it too.
            context = total - free - torch.cuda.memory_reserved(device)
            if self.card_gib:
                cap = min(total, self.card_gib * GIB - context)
                torch.cuda.set_per_process_memory_fraction(cap / total, device)
                setup["allocator_cap_gib"] = cap / GIB
                setup["held_beyond_card_gib"] = self._hold_beyond_card(torch, device, free, total) / GIB
            setup.update(total_gib=total / GIB, context_gib=context / GIB,
                         allocator_backend=torch.cuda.get_allocator_backend())
            threading.Thread(target=self._sample_memory, name="realrun-memory", daemon=True).start()
            self._segment_at_peak_resets(torch)
            if os.environ.get("REALRUN_OOM_REPORT"):
                report_out_of_memory(torch, os.environ["REALRUN_OOM_REPORT"])
        # What ComfyUI made of it (names of 0.3.75; absent ones are left out).
        reserved = getattr(model_management, "extra_reserved_memory", None)
        state = getattr(model_management, "vram_state", None)
        setup.update(comfy_reserved_gib=reserved() / GIB if reserved else None,
                     comfy_vram_state=getattr(state, "name", None),
                     comfy_total_vram_gib=getattr(model_management, "total_vram", 0) / 1024)
        self.record("setup", **setup)

    def _hold_beyond_card(self, torch, device, free: int, total: int) -> int:
        """Takes the memory beyond the simulated card from the driver (`cuMemAlloc`, outside PyTorch's allocator,
        held for the process's life), so that the card's size is a physical limit too. The fraction caps only
        the bytes PyTorch has in use; cudaMallocAsync (a ComfyUI server's default allocator) keeps what was freed
        in its pool, and on a real card that pool meets the card's end, is trimmed and retried; here it would
        grow into the rest of the GPU instead. Returns the bytes held (0 where they could not be taken, noted)."""
        import ctypes

        size = total - int(self.card_gib * GIB)
        if size <= 0:
            return 0
        if size >= free:
            self.note(f"the GPU has {free / GIB:.1f} GiB free, not the {size / GIB:.1f} GiB beyond the simulated "
                      "card: only the allocator's cap simulates it")
            return 0
        try:
            driver = ctypes.CDLL("libcuda.so.1")
            pointer = ctypes.c_uint64()
            with torch.cuda.device(device):  # makes the device's primary context current in this thread
                status = driver.cuMemAlloc_v2(ctypes.byref(pointer), ctypes.c_size_t(size))
        except OSError as error:
            status = str(error)
        if status != 0:
            self.note(f"could not hold the {size / GIB:.1f} GiB beyond the simulated card (cuMemAlloc: {status}): "
                      "only the allocator's cap simulates it")
            return 0
        self.held_beyond_card = size
        return size

    def _segment_at_peak_resets(self, torch) -> None:
        """A reset of the peak counters (the engine's, as a run starts) ends a segment and starts the next."""
        reset = torch.cuda.reset_peak_memory_stats
        probe = self

        @functools.wraps(reset)
        def segmented_reset(*args, **kwargs):
            with probe._lock:
                probe._close_segment_locked()
                reset(*args, **kwargs)
                probe._segment = probe._new_segment()

        torch.cuda.reset_peak_memory_stats = segmented_reset

    # -- the engine ---------------------------------------------------------------------------

    def in_phase(self, name: str, function):
        @functools.wraps(function)
        def wrapped(*args, **kwargs):
            with self.phase(name):
                return function(*args, **kwargs)

        return wrapped

    def wrap(self, owner, attribute: str, name: str) -> None:
        function = getattr(owner, attribute, None)
        if function is None:
            self.note(f"nothing to wrap: {getattr(owner, '__name__', owner)}.{attribute}")
            return
        setattr(owner, attribute, self.in_phase(name, function))

    def compiled_frames(self) -> int | None:
        utils = sys.modules.get("torch._dynamo.utils")
        return None if utils is None else int(utils.counters["frames"]["ok"])

    def tap_events(self, job_module) -> None:
        """Records each event a TrainingJob queues, when it is queued (the step's end: the loss is read there)."""
        job_class = getattr(job_module, "TrainingJob", None)
        if job_class is None:
            self.note("no TrainingJob to tap")
            return
        probe = self
        original_init = job_class.__init__

        @functools.wraps(original_init)
        def init(job, *args, **kwargs):
            original_init(job, *args, **kwargs)
            events = getattr(job, "_events", None)
            if events is None:
                probe.note("TrainingJob has no _events queue: no event times")
                return
            put = events.put

            def recorded_put(event, *put_args, **put_kwargs):
                data = {k: v for k, v in event.data.items() if isinstance(v, (int, float, str, bool, type(None)))}
                probe.record("event", t=time.monotonic(), event=event.kind, data=data, frames=probe.compiled_frames())
                return put(event, *put_args, **put_kwargs)

            events.put = recorded_put

        job_class.__init__ = init
        self.wrap(job_class, "_main", "training")

    def tap_batches(self, trainer_module) -> None:
        trainer_class = getattr(trainer_module, "Trainer", None)
        draw = getattr(trainer_class, "_next_batch", None)
        if draw is None:
            self.note("no Trainer._next_batch: no bucket per step")
            return
        probe = self

        @functools.wraps(draw)
        def next_batch(trainer, *args, **kwargs):
            latents, conditioning = draw(trainer, *args, **kwargs)
            probe.record("batch", t=time.monotonic(), shape=list(latents.shape))
            return latents, conditioning

        trainer_class._next_batch = next_batch

    def after_import(self, name: str, module) -> None:
        engine_module = name.rpartition(f"{ENGINE}.")[2] if f"{ENGINE}." in name else None
        if name == "torch.cuda.memory":
            if self.card_gib:
                self.report_card_size(module)
        elif name == "comfy.cli_args":
            self.set_reserve(module)
        elif name == "comfy.model_management":
            self.cap_allocator(module)
        elif engine_module == "loading":
            for function in ("load_diffusion_model", "load_text_encoders", "load_vae"):
                self.wrap(module, function, "loading")
        elif engine_module == "data":
            self.wrap(module, "build_samples", "caching")
        elif engine_module == "sampling":
            self.wrap(module, "encode_prompts", "caching")
            self.wrap(getattr(module, "SampleHook", None), "on_step", "sampling")
        elif engine_module == "export":
            for function in ("save_checkpoint", "write_lora"):
                self.wrap(module, function, "saving")
        elif engine_module == "job":
            self.tap_events(module)
        elif engine_module == "trainer":
            self.tap_batches(module)


HOOKED = ("torch.cuda.memory", "comfy.cli_args", "comfy.model_management")
HOOKED_ENGINE = ("loading", "data", "sampling", "export", "job", "trainer")


def _is_hooked(name: str) -> bool:
    if name in HOOKED:
        return True
    head, _, last = name.rpartition(".")
    return last in HOOKED_ENGINE and (head == ENGINE or head.endswith(f".{ENGINE}"))


class _AfterImport(importlib.abc.MetaPathFinder):
    """Finds hooked modules through the other finders and runs the probe on each right after it executes,
    before any `from module import name` elsewhere can copy a name out of it."""

    def __init__(self, probe: Probe):
        self.probe = probe

    def find_spec(self, name, path, target=None):
        if not _is_hooked(name):
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        spec.loader = _Loader(spec.loader, self.probe, name)
        return spec


class _Loader(importlib.abc.Loader):
    def __init__(self, loader, probe: Probe, name: str):
        self.loader, self.probe, self.name = loader, probe, name

    def __getattr__(self, name):
        # get_source, get_resource_reader and the like: the wrapped loader's.
        return getattr(self.loader, name)

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        self.loader.exec_module(module)
        try:
            self.probe.after_import(self.name, module)
        except Exception as error:  # noqa: BLE001 - measuring must never stop the run it measures
            self.probe.note(f"probe failed on {self.name}: {error!r}")


# Frames worth naming in an out-of-memory report: the engine's, ComfyUI's, checkpointing's and the compiler's.
REPORTED_FRAMES = ("trainer_core", "comfy/", "torch/utils/checkpoint", "torch/_functorch", "torch/_inductor",
                   "torch/_dynamo", "torch/autograd")


def report_out_of_memory(torch, path: str) -> None:
    """REALRUN_OOM_REPORT: where the allocator runs out of memory, the tensors alive at that moment grouped by
    where they were allocated (the three innermost frames of REPORTED_FRAMES), largest first, in `path`.
    Records each allocation's Python stack: slower, for diagnosing runs only."""
    torch.cuda.memory._record_memory_history(enabled="state", context="alloc", stacks="python")

    def observer(device, allocating, device_allocated, device_free):
        try:
            write_report(allocating, device_allocated, device_free)
        except Exception as error:  # noqa: BLE001 - the report must not replace the run's own error
            Path(path).write_text(f"no report: {error!r}\n")

    def write_report(allocating, device_allocated, device_free):
        groups: dict[tuple, list[int]] = {}
        for segment in torch.cuda.memory._snapshot()["segments"]:
            for block in segment["blocks"]:
                if block["state"] != "active_allocated":
                    continue
                frames = [f"{f['filename'].rsplit('site-packages/', 1)[-1]}:{f['line']} {f['name']}"
                          for f in block.get("frames", []) if any(k in f["filename"] for k in REPORTED_FRAMES)]
                key = (segment["stream"] != 0, *frames[:3])
                groups.setdefault(key, []).append(block["size"])
        lines = [f"out of memory allocating {allocating / GIB:.3f} GiB; allocated {device_allocated / GIB:.3f} GiB, "
                 f"free {device_free / GIB:.3f} GiB; alive: {sum(map(sum, groups.values())) / GIB:.3f} GiB"]
        for key, sizes in sorted(groups.items(), key=lambda item: -sum(item[1]))[:40]:
            side = "side stream " if key[0] else ""
            lines.append(f"{sum(sizes) / GIB:8.3f} GiB {len(sizes):5d} x {side}" + " <- ".join(key[1:]))
        Path(path).write_text("\n".join(lines) + "\n")

    torch._C._cuda_attach_out_of_memory_observer(observer)


def install() -> Probe | None:
    """Starts the probe named by the environment (REALRUN_PROBE, REALRUN_CARD_GIB, REALRUN_RESERVE_GIB)."""
    path = os.environ.get("REALRUN_PROBE")
    if not path:
        return None
    card = os.environ.get("REALRUN_CARD_GIB")
    reserve = os.environ.get("REALRUN_RESERVE_GIB")
    probe = Probe(path, float(card) if card else None, float(reserve) if reserve else None)
    sys.meta_path.insert(0, _AfterImport(probe))
    import atexit

    atexit.register(probe.finish)
    return probe
