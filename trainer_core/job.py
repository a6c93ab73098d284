"""A training run on a background thread, with an event stream, cancel and periodic hooks.

The node (or the command line) starts a TrainingJob, reads `events()` until the job is done,
and calls `result()`; an exception in the thread is re-raised there with its traceback. Hooks
(periodic samples, checkpoints) run on the training thread between two steps, so the model
is never used by two threads at once.
"""

import contextlib
import logging
import queue
import threading
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field

import comfy.model_management
import torch

from . import comfy_compat
from .graphs import under_cuda_malloc_async
from .lora import LoraNetwork
from .trainer import StepReport, Trainer

log = logging.getLogger(__name__)


@dataclass
class Event:
    """kind: "started" (data: step to start from, total_steps, whether the first step compiles),
    "step" (with peak_vram_bytes: None off CUDA, and blocks_swapped: how many blocks block swap keeps off the
    card), "sample", "saved", "error", "done" (data: {"cancelled": bool})."""

    kind: str
    data: dict = field(default_factory=dict)


class JobHook:
    """Work between two steps. `every` > 0 runs `on_step` every that many steps; `on_end` runs
    once when training ends, finished or cancelled (not after an error). At the last step `on_step`
    runs only for hooks with `at_last_step` (there, still inside the training session: the model
    loaded as for training, the LoRA attached); the others do their last work in `on_end`."""

    every: int = 0
    at_last_step: bool = False

    def on_step(self, trainer: Trainer) -> list[Event]:
        return []

    def on_end(self, trainer: Trainer, cancelled: bool) -> list[Event]:
        return []


class TrainingFailed(RuntimeError):
    pass


class OutOfMemory(RuntimeError):
    """A step ran out of memory; the message says what was saved and which settings need less."""


# What a run holds in memory, by the settings that lower it (the node's name / lora-train's key).
MEMORY_SETTINGS = (
    "store the model's weights in fp8 (Load Base Model's weight_dtype / model.quantize)",
    "turn gradient_checkpointing on",
    "keep blocks of the model in host memory (Train LoRA's blocks_to_swap / train.blocks_to_swap: -1 or auto "
    "picks how many)",
    "lower batch_size or the dataset's resolution",
    "make the previews smaller (sample_size / sample.width and sample.height)",
)
# Where the run allocates through cudaMallocAsync (a ComfyUI server's default), whose pool keeps freed memory in the
# sizes it was carved (bench/NOTES.md §15).
ASYNC_ALLOCATOR_SETTING = ("start ComfyUI with --disable-cuda-malloc (its default allocator, cudaMallocAsync, holds "
                           "memory the steps freed in sizes later steps cannot always reuse)")


class TrainingJob:
    def __init__(self, trainer: Trainer, hooks: list[JobHook] | None = None):
        self.trainer = trainer
        self.hooks = hooks or []
        self._events: queue.Queue[Event] = queue.Queue()
        self._cancel = threading.Event()
        # Hooks asked to run at the next step boundary, each once however often it was asked.
        self._requested: list[JobHook] = []
        self._requests_lock = threading.Lock()
        self._error: BaseException | None = None
        self._traceback = ""
        self._thread = threading.Thread(target=self._main, name="lora-training", daemon=True)
        self._started_at = 0.0
        self._first_step = (0.0, 0, 0)  # (time, step, samples seen) after the first step
        # (step, folder) of the newest checkpoint a hook saved. A checkpoint hook that saved at the
        # step a run stops at does not save it again, so the message of that stop names this one.
        self._last_checkpoint: tuple[int, str] | None = None
        # Whether previews or saves are running between two steps (an out-of-memory error there is not a step's).
        self._hooks_running = False
        self._compiling = _CompileTime()

    # -- control, from any thread ------------------------------------------------------------

    def start(self) -> "TrainingJob":
        self._thread.start()
        return self

    def cancel(self) -> None:
        """Stops at the next step boundary; the `on_end` hooks still run (cancelled=True)."""
        self._cancel.set()

    def request(self, hook: JobHook) -> bool:
        """Runs `hook.on_step` once at the next step boundary (e.g. "save now"). Requests of one hook
        before that boundary are one; returns False for a request already made."""
        with self._requests_lock:
            if hook in self._requested:
                return False
            self._requested.append(hook)
            return True

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def events(self, poll_seconds: float = 0.1) -> Iterator[Event]:
        """Yields events until the job has finished; the last one is "done" or "error"."""
        while True:
            try:
                event = self._events.get(timeout=poll_seconds)
            except queue.Empty:
                if not self._thread.is_alive() and self._events.empty():
                    return
                continue
            yield event
            if event.kind in ("done", "error"):
                return

    def result(self) -> LoraNetwork:
        """Waits for the thread; returns the trained network or raises what the thread raised."""
        self._thread.join()
        if self._error is not None:
            raise TrainingFailed(f"training failed: {self._error}\n{self._traceback}") from self._error
        return self.trainer.network

    def __enter__(self) -> "TrainingJob":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        # The thread never outlives the job.
        self.cancel()
        self._thread.join()

    # -- the training thread -----------------------------------------------------------------

    def _main(self) -> None:
        self._started_at = time.perf_counter()
        trainer = self.trainer
        if trainer.device.type == "cuda":
            # The peak shown is this run's (steps, previews, saves), not that of what the process did before.
            torch.cuda.reset_peak_memory_stats(trainer.device)
        # Before the first step, which can take minutes where blocks compile: say the run is on.
        self._events.put(Event("started", {"step": trainer.state.step, "total_steps": trainer.config.steps,
                                           "compiling": trainer.compiles_blocks}))
        try:
            out_of_memory = ""
            try:
                self.trainer.run(self._between_steps)
            except comfy.model_management.InterruptProcessingException:
                # ComfyUI's ops check its Cancel flag (and clear it) inside the model's forward: the
                # step in flight is dropped, and the run ends as cancelled at the last whole step.
                self._cancel.set()
            except torch.OutOfMemoryError as error:
                # As a Cancel: the step in flight is dropped and the last whole step saved; the
                # error (and the memory its traceback holds) is let go before the hooks save.
                out_of_memory = str(error).strip().splitlines()[0] if str(error).strip() else "out of memory"
                self._cancel.set()
            cancelled = self._cancel.is_set()
            with self._paused():
                for hook in self.hooks:
                    self._emit(hook.on_end(self.trainer, cancelled))
            if out_of_memory:
                raise OutOfMemory(self._out_of_memory_message(out_of_memory))
            self._events.put(Event("done", {"cancelled": cancelled, "step": self.trainer.state.step}))
        except OutOfMemory as error:
            self._error = error
            self._traceback = ""
            log.error("%s", error)
            self._events.put(Event("error", {"message": str(error), "traceback": ""}))
        except BaseException as error:  # noqa: BLE001 - handed to the caller in result()
            self._error = error
            self._traceback = traceback.format_exc()
            log.error("training failed: %s", self._traceback)
            self._events.put(Event("error", {"message": str(error), "traceback": self._traceback}))
        finally:
            self.trainer.release()

    def _out_of_memory_message(self, error: str) -> str:
        step = self.trainer.state.step
        saved_step, folder = self._last_checkpoint or (None, "")
        saved = saved_step == step
        kept = (f"the last whole step, {step}, is saved in {folder}" if saved
                else f"the run stopped at step {step}, and no checkpoint was saved")
        where = f"while previewing or saving after step {step}" if self._hooks_running else f"in step {step + 1}"
        settings = list(MEMORY_SETTINGS)
        if under_cuda_malloc_async(self.trainer.device):
            settings.append(ASYNC_ALLOCATOR_SETTING)
        return (f"out of memory {where} ({error}); {kept}. To fit, " + "; or ".join(settings)
                + (", then resume from that checkpoint" if saved else ""))

    def _between_steps(self, trainer: Trainer, reports: list[StepReport]) -> bool:
        if self._first_step[1]:
            self._compiling.step_ended(trainer.state.samples_seen)
        for report in reports:
            self._events.put(Event("step", self._step_data(report)))
        step = trainer.state.step
        if step < trainer.config.steps:
            due = [hook for hook in self.hooks if hook.every and step % hook.every == 0]
        else:
            due = [hook for hook in self.hooks if hook.at_last_step]
        with self._requests_lock:
            requested, self._requested = self._requested, []
        # A hook that is due anyway runs once at this step.
        due += [hook for hook in requested if hook not in due]
        if due:
            self._hooks_running = True
            with self._paused():
                for hook in due:
                    self._emit(hook.on_step(trainer))
            self._hooks_running = False
        self._compiling.step_begins(trainer.state.samples_seen)
        return not self._cancel.is_set()

    @contextlib.contextmanager
    def _paused(self):
        """Sampling and saving see the LoRA without dropout and without building a graph, and the host
        uses its inference kernels."""
        self.trainer.network.eval()
        try:
            with torch.no_grad(), comfy_compat.training_mode(False):
                yield
        finally:
            self.trainer.network.train()

    def _emit(self, events: list[Event]) -> None:
        for event in events:
            if event.kind == "saved" and event.data.get("kind") == "checkpoint":
                self._last_checkpoint = (event.data["step"], event.data["path"])
            self._events.put(event)

    def _step_data(self, report: StepReport) -> dict:
        now = time.perf_counter()
        if report.step == 1 or self._first_step[1] == 0:
            self._first_step = (now, report.step, report.samples_seen)
        since, first_step, first_seen = self._first_step
        # Rates are measured from the end of the first step, which carries the warm-up, and leave out
        # later steps that compiled (a new input shape): they would stretch the ETA of every step after.
        compiling = self._compiling
        elapsed = now - since - compiling.seconds
        steps_done = report.step - first_step - compiling.steps
        samples = report.samples_seen - first_seen - compiling.samples
        rate = samples / elapsed if elapsed > 0 and steps_done > 0 else 0.0
        eta = elapsed / steps_done * (report.total_steps - report.step) if steps_done > 0 else None
        return {
            "step": report.step,
            "total_steps": report.total_steps,
            "loss": report.loss,
            "lr": report.lr,
            "images_per_second": rate,
            "eta_seconds": eta,
            "elapsed_seconds": now - self._started_at,
            "peak_vram_bytes": peak_vram_bytes(self.trainer.device),
            "blocks_swapped": self.trainer.blocks_swapped,
            # Known once the session has planned its memory (whether steps are recorded).
            "notice": self.trainer.allocator_notice,
        }


class _CompileTime:
    """The steps in which torch.compile compiled something, and their time: dynamo counts each
    frame it compiles (or tries to), and a step during which the count rose spent time compiling."""

    def __init__(self):
        self.seconds = 0.0
        self.steps = 0
        self.samples = 0
        self._began = (0.0, 0, 0)  # (time, dynamo's frame count, samples seen) when the step began

    def step_begins(self, samples_seen: int) -> None:
        self._began = (time.perf_counter(), _frames_compiled(), samples_seen)

    def step_ended(self, samples_seen: int) -> None:
        began, frames, seen = self._began
        if _frames_compiled() != frames:
            self.seconds += time.perf_counter() - began
            self.steps += 1
            self.samples += samples_seen - seen


def _frames_compiled() -> int:
    return torch._dynamo.utils.counters["frames"]["total"]


def peak_vram_bytes(device: torch.device) -> int | None:
    """The most memory PyTorch has held for tensors on a CUDA device since the run started
    (torch.cuda.max_memory_allocated); None on other devices, which keep no such count."""
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
