"""What the browser's training panel shows and does: a record of each run built from its events, the
routes that serve it (`GET /lora_trainer/status`) and the panel's two actions (`POST
/lora_trainer/save_now`, `POST /lora_trainer/stop`).

The Train LoRA node opens a record when a run starts and feeds it every event; the record keeps what a
page reloaded mid-run needs to redraw the chart and the gallery. Records of finished runs stay (the
newest few) so a page opened after a run still shows it.
"""

import json
import re
import threading
import time
import uuid
from pathlib import Path

import torch

from ..trainer_core.export import CheckpointHook
from ..trainer_core.job import Event, TrainingJob

ROUTE_PREFIX = "/lora_trainer"
KEPT_RUNS = 16
# ComfyUI's node ids: digits, and "parent:child" inside subgraphs.
NODE_ID = re.compile(r"[0-9A-Za-z_:.-]{1,64}")
RUN_ID = re.compile(r"[0-9a-f]{32}")
# A panel action's body is {"run_id": "<32 hex digits>"}; nothing longer is read.
MAX_BODY_BYTES = 16 * 1024


class RunRecord:
    """One run as the panel shows it. `status`: running, finished, stopped (cancelled, resumable
    checkpoint saved) or failed."""

    def __init__(self, node: str, name: str, total_steps: int, job: TrainingJob, output_dir: Path,
                 checkpoint_hook: CheckpointHook):
        self.run_id = uuid.uuid4().hex
        self.node = node
        self.name = name
        self.total_steps = total_steps
        self.job = job
        self.output_dir = Path(output_dir).resolve()
        self.checkpoint_hook = checkpoint_hook
        self.status = "running"
        self.step = 0
        self.started_at = time.time()
        self.history: dict[str, list] = {"step": [], "loss": [], "lr": []}
        # The validation loss's evaluations (a held-out set's): steps and losses, fewer than the steps'.
        self.validation: dict[str, list] = {"step": [], "loss": []}
        # From the newest step; peak_vram_bytes stays None off CUDA.
        self.rates: dict[str, float | None] = {"images_per_second": None, "eta_seconds": None,
                                               "elapsed_seconds": None, "peak_vram_bytes": None,
                                               "blocks_swapped": None}
        self.samples: list[dict] = []
        self.saves: list[dict] = []
        self.error: str | None = None
        self.save_requested = False
        # Between "started" and the first step of a run whose blocks compile (minutes).
        self.compiling = False
        # What the run says from its first step on (steps held back from CUDA graphs by ComfyUI's allocator); "".
        self.notice = ""
        # Events arrive on the node's thread, status requests on the server's.
        self._lock = threading.Lock()

    def record(self, event: Event) -> dict:
        """Takes in one event of the run; returns what the browser is sent for it."""
        data = {key: value for key, value in event.data.items() if not isinstance(value, torch.Tensor)}
        with self._lock:
            self._take(event.kind, data)
        return data | {"run_id": self.run_id, "node": self.node}

    def _take(self, kind: str, data: dict) -> None:
        if kind == "started":
            self.step = data["step"]
            self.compiling = data["compiling"]
            self.notice = ""
        elif kind == "step":
            self.compiling = False
            self.notice = data["notice"]
            self.step = data["step"]
            for key in self.history:
                self.history[key].append(data[key])
            self.rates = {key: data.get(key) for key in self.rates}
        elif kind == "validation":
            self.validation["step"].append(data["step"])
            self.validation["loss"].append(data["validation_loss"])
        elif kind == "sample":
            data["images"] = [self._view_reference(path) for path in data.pop("files")]
            self.samples.extend(
                {"step": data["step"], "prompt": prompt, "image": image}
                for prompt, image in zip(data["prompts"], data["images"], strict=True)
            )
        elif kind == "saved":
            if data["kind"] == "checkpoint":
                self.save_requested = False
            self.saves.append({key: data[key] for key in ("kind", "step", "name") if key in data})
        elif kind == "done":
            self.status = "stopped" if data["cancelled"] else "finished"
        elif kind == "error":
            self.status = "failed"
            self.error = data["message"]
            data.pop("traceback", None)

    def snapshot(self) -> dict:
        with self._lock:
            return {
                "run_id": self.run_id, "node": self.node, "name": self.name, "status": self.status,
                "step": self.step, "total_steps": self.total_steps, "started_at": self.started_at,
                "history": self.loss_history(), **self.rates,
                "samples": list(self.samples), "saves": list(self.saves), "error": self.error,
                "save_requested": self.save_requested, "compiling": self.compiling, "notice": self.notice,
            }

    def loss_history(self) -> dict:
        """The run's losses: {"step", "loss", "lr"}: one entry per logged step, as before validation losses
        existed; "validation": {"step", "loss"}: one entry per evaluation of the held-out set (empty without)."""
        history = {key: list(values) for key, values in self.history.items()}
        return history | {"validation": {key: list(values) for key, values in self.validation.items()}}

    @property
    def lora_name(self) -> str:
        """The finished LoRA's name as the LoRA Loader lists it; empty until it is saved."""
        with self._lock:
            return next((save["name"] for save in reversed(self.saves) if save["kind"] == "lora"), "")

    def request_save(self) -> bool:
        """A checkpoint at the next step boundary, as the periodic ones are; False where one is
        already asked for (requests before a step boundary make one checkpoint)."""
        self.save_requested = True
        return self.job.request(self.checkpoint_hook)

    def _view_reference(self, path: str) -> dict | None:
        """Where ComfyUI's /view serves a file of the output folder; None for a file elsewhere,
        which the browser is never pointed at."""
        file = Path(path).resolve()
        if not file.is_relative_to(self.output_dir):
            return None
        subfolder = file.parent.relative_to(self.output_dir).as_posix()
        return {"filename": file.name, "subfolder": "" if subfolder == "." else subfolder, "type": "output"}


class LiveRuns:
    """The records of this server's runs, newest last: every running one and the newest `kept`
    finished ones. Safe to use from the training node's thread and the server's event loop."""

    def __init__(self, kept: int = KEPT_RUNS):
        self.kept = kept
        self._runs: list[RunRecord] = []
        self._lock = threading.Lock()

    def add(self, run: RunRecord) -> RunRecord:
        with self._lock:
            self._runs.append(run)
            finished = [r for r in self._runs if r.status != "running"]
            for old in finished[: max(0, len(finished) - self.kept)]:
                self._runs.remove(old)
        return run

    def newest(self, node: str | None = None) -> RunRecord | None:
        with self._lock:
            return next((r for r in reversed(self._runs) if node is None or r.node == node), None)

    def find(self, run_id: str) -> RunRecord | None:
        with self._lock:
            return next((r for r in self._runs if r.run_id == run_id), None)


RUNS = LiveRuns()


class RequestError(ValueError):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def status_of(query: dict) -> dict:
    """The newest run's snapshot, or that of the newest run of `query["node"]`; {"run": None} if none."""
    node = query.get("node")
    if node is not None and not NODE_ID.fullmatch(node):
        raise RequestError(400, f"node must be a node id such as '12' or '5:3', not {node[:80]!r}")
    run = RUNS.newest(node)
    return {"run": run.snapshot() if run else None}


def running_run(body) -> RunRecord:
    """The running run a panel action names by {"run_id": ...}."""
    if not isinstance(body, dict) or not isinstance(body.get("run_id"), str):
        raise RequestError(400, 'send a JSON object {"run_id": "<the run id from /lora_trainer/status>"}')
    run_id = body["run_id"]
    if not RUN_ID.fullmatch(run_id):
        raise RequestError(400, f"run_id must be 32 hex digits, not {run_id[:80]!r}")
    run = RUNS.find(run_id)
    if run is None:
        raise RequestError(404, f"no run {run_id} on this server")
    if run.status != "running":
        raise RequestError(409, f"run {run_id} has already ended ({run.status})")
    return run


def save_now(body) -> dict:
    run = running_run(body)
    queued = run.request_save()
    return {"run_id": run.run_id, "status": run.status, "save_requested": True, "already_requested": not queued}


def stop_and_save(body) -> dict:
    """Ends the run at the next step boundary, as Cancel does: a resumable checkpoint is saved."""
    run = running_run(body)
    run.job.cancel()
    return {"run_id": run.run_id, "status": run.status, "stopping": True}


async def json_body(request):
    """The request's JSON body, or None for one that is not JSON (the action then says what to send).
    Raises a 413 for a body over MAX_BODY_BYTES, read no further than that."""
    too_large = RequestError(413, f"the body is larger than {MAX_BODY_BYTES // 1024} KiB; "
                                  'send {"run_id": "<the run id from /lora_trainer/status>"}')
    if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
        raise too_large
    raw = bytearray()
    while len(raw) <= MAX_BODY_BYTES:
        chunk = await request.content.read(MAX_BODY_BYTES + 1 - len(raw))
        if not chunk:
            break
        raw += chunk
    if len(raw) > MAX_BODY_BYTES:
        raise too_large
    try:
        return json.loads(raw.decode("utf-8"))
    # Not UTF-8, not JSON, or nested deeper than the parser recurses.
    except (ValueError, RecursionError):
        return None


def register_routes(routes) -> None:
    """Adds the panel's routes to ComfyUI's aiohttp route table (before the server starts)."""
    from aiohttp import web

    def answer(action):
        async def handler(request: web.Request) -> web.Response:
            try:
                if request.method == "GET":
                    result = action(dict(request.query))
                else:
                    result = action(await json_body(request))
            except RequestError as error:
                return web.json_response({"error": str(error)}, status=error.status)
            return web.json_response(result)

        return handler

    routes.get(f"{ROUTE_PREFIX}/status")(answer(status_of))
    routes.post(f"{ROUTE_PREFIX}/save_now")(answer(save_now))
    routes.post(f"{ROUTE_PREFIX}/stop")(answer(stop_and_save))
