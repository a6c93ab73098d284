"""A real headless ComfyUI server for end-to-end tests, driven over HTTP.

The fixture is session-scoped: starting the server (importing torch, ComfyUI's ~100 node modules and
this pack) is the dominant cost of the live tests, and a long-lived server taking many prompts is how
ComfyUI runs for users anyway. Tests share it, so each one gives its files unique names and never
relies on the server's history or node cache being empty.

The server runs from the host folder (`COMFYUI_PATH`, else the repo's `.comfyui`) with the tests' own
interpreter, in CPU mode. Its input, output, temp and user folders and its model folders (checkpoints,
loras, vae, text_encoders, clip, diffusion_models, first in the search order through an extra model
paths file) live in a temp folder; its log goes to `<that folder>/server.log`. The fixture's server also
loads the test-only nodes of `tests/graph_nodes`, from a custom_nodes folder in the temp folder that the
same file names: nothing is added to the host folder.
"""

import asyncio
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

log = logging.getLogger(__name__)

MODEL_FOLDERS = ("checkpoints", "loras", "vae", "text_encoders", "clip", "diffusion_models")
STARTUP_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 10.0
POLL_INTERVAL_S = 0.2
LOG_TAIL_LINES = 60
GRAPH_NODES = Path(__file__).resolve().parent / "graph_nodes"


def comfy_host_path() -> Path:
    return Path(os.environ.get("COMFYUI_PATH") or Path(__file__).resolve().parents[1] / ".comfyui").resolve()


class ComfyServerError(RuntimeError):
    """The server died, never answered, refused a request or failed a prompt; the message says which."""


@dataclass
class ComfyServer:
    url: str
    port: int
    host_dir: Path
    log_path: Path
    models_dir: Path
    input_dir: Path
    output_dir: Path
    process: subprocess.Popen
    # ComfyUI sends a prompt's progress events to the websocket client that queued it.
    client_id: str = field(default_factory=lambda: uuid.uuid4().hex)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def get_json(self, path: str, timeout: float = 30.0) -> Any:
        return self._request("GET", path, None, timeout)

    def post_json(self, path: str, body: Any, timeout: float = 30.0) -> Any:
        return self._request("POST", path, body, timeout)

    def post_prompt(self, api_graph: dict, client_id: str | None = None) -> str:
        """Queues an API-format graph for `client_id` (default: the server's own); returns its prompt id.
        A graph that fails validation raises, also where ComfyUI would run the outputs that passed."""
        answer = self.post_json("/prompt", {"prompt": api_graph, "client_id": client_id or self.client_id})
        if answer.get("node_errors"):
            raise ComfyServerError(f"the graph has invalid nodes: {json.dumps(answer['node_errors'], indent=1)}")
        return answer["prompt_id"]

    @contextmanager
    def events(self) -> Iterator["EventStream"]:
        """A websocket client of its own: the messages ComfyUI sends it, and the prompts it queues."""
        with EventStream(self) as stream:
            yield stream

    def wait_for(self, prompt_id: str, timeout: float = 120.0) -> dict:
        """Waits until the prompt has run; returns its history entry. Raises if it failed or took too long."""
        entry = self.history_entry(prompt_id, timeout)
        if entry["status"]["status_str"] != "success":
            raise ComfyServerError(f"prompt {prompt_id} failed:\n{_describe_failure(entry)}")
        return entry

    def history_entry(self, prompt_id: str, timeout: float = 120.0) -> dict:
        """Waits until the prompt has run, successfully or not; returns its history entry."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            entry = self.get_json(f"/history/{prompt_id}").get(prompt_id)
            if entry is not None:
                return entry
            self.check_alive()
            time.sleep(POLL_INTERVAL_S)
        # Stop it, so the next test's prompt does not queue behind it.
        self.post_json("/interrupt", {})
        raise ComfyServerError(
            f"prompt {prompt_id} did not finish in {timeout:.0f} s; queue: {self.get_json('/queue')}\n"
            f"server log tail ({self.log_path}):\n{self.log_tail()}"
        )

    def wait_until_ready(self, timeout: float = STARTUP_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                self.get_json("/system_stats", timeout=5.0)
                return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(POLL_INTERVAL_S)
        raise ComfyServerError(
            f"ComfyUI did not answer on {self.url} within {timeout:.0f} s.\n"
            f"server log tail ({self.log_path}):\n{self.log_tail()}"
        )

    def check_alive(self) -> None:
        code = self.process.poll()
        if code is not None:
            raise ComfyServerError(
                f"ComfyUI exited with code {code}.\nserver log tail ({self.log_path}):\n{self.log_tail()}"
            )

    def _request(self, method: str, path: str, body: Any, timeout: float) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            self.url + path, data=data, method=method, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                payload = response.read()
        except urllib.error.HTTPError as error:
            raise ComfyServerError(
                f"{method} {path} answered {error.code}: {error.read().decode(errors='replace')}"
            ) from error
        return json.loads(payload) if payload.strip() else None


class EventStream:
    """The messages ComfyUI sends one websocket client, collected on a thread: JSON messages as
    {"type": ..., "data": ...} in arrival order; binary ones (preview images) only counted. ComfyUI
    sends progress to the client that queued a prompt, so queue through `post_prompt` here."""

    def __init__(self, server: ComfyServer):
        self.server = server
        # A client id of its own: ComfyUI drops a client id's socket when an older socket of that id closes.
        self.client_id = uuid.uuid4().hex
        self.previews = 0
        self._messages: list[dict] = []
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._socket: aiohttp.ClientWebSocketResponse | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="comfy-events", daemon=True)

    def __enter__(self) -> "EventStream":
        self._thread.start()
        # ComfyUI greets a registered client with a "status" message.
        self.wait_for(lambda m: m["type"] == "status", timeout=30.0)
        return self

    def __exit__(self, *exc_info) -> None:
        if self._loop is not None and self._socket is not None:
            asyncio.run_coroutine_threadsafe(self._socket.close(), self._loop).result(timeout=STOP_TIMEOUT_S)
        self._thread.join(timeout=STOP_TIMEOUT_S)

    def post_prompt(self, api_graph: dict) -> str:
        return self.server.post_prompt(api_graph, self.client_id)

    def messages(self, kind: str | None = None, prompt_id: str | None = None) -> list[dict]:
        """The messages so far, optionally of one type and about one prompt."""
        with self._lock:
            found = list(self._messages)
        return [
            m for m in found
            if (kind is None or m["type"] == kind) and (prompt_id is None or m["data"].get("prompt_id") == prompt_id)
        ]

    def wait_for(self, condition: Callable[[dict], bool], timeout: float = 120.0) -> dict:
        """The first message (since the stream opened) that meets `condition`; raises after `timeout`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._error is not None:
                raise ComfyServerError(f"the websocket {self._url} failed: {self._error!r}")
            found = next((m for m in self.messages() if condition(m)), None)
            if found is not None:
                return found
            self.server.check_alive()
            time.sleep(POLL_INTERVAL_S)
        kinds = sorted({m["type"] for m in self.messages()})
        raise ComfyServerError(f"no such websocket message in {timeout:.0f} s; got types {kinds}")

    def wait_until_done(self, prompt_id: str, timeout: float = 120.0) -> str:
        """Waits for the message that ends a prompt's run; every message the run sent has arrived by then.
        Returns its type: execution_success, execution_error or execution_interrupted."""
        ends = ("execution_success", "execution_error", "execution_interrupted")
        return self.wait_for(lambda m: m["type"] in ends and m["data"].get("prompt_id") == prompt_id, timeout)["type"]

    @property
    def _url(self) -> str:
        return f"ws://127.0.0.1:{self.server.port}/ws?clientId={self.client_id}"

    def _run(self) -> None:
        try:
            asyncio.run(self._receive())
        except Exception as error:  # noqa: BLE001 - reported by wait_for, on the test's thread
            self._error = error

    async def _receive(self) -> None:
        self._loop = asyncio.get_running_loop()
        async with aiohttp.ClientSession() as session, session.ws_connect(self._url, max_msg_size=0) as socket_:
            self._socket = socket_
            async for message in socket_:
                if message.type == aiohttp.WSMsgType.TEXT:
                    with self._lock:
                        self._messages.append(json.loads(message.data))
                elif message.type == aiohttp.WSMsgType.BINARY:
                    self.previews += 1


def _describe_failure(entry: dict) -> str:
    for event, data in entry["status"].get("messages", []):
        if event == "execution_error":
            return (
                f"node {data['node_id']} ({data['node_type']}) raised {data['exception_type']}: "
                f"{data['exception_message']}\n{''.join(data['traceback'])}"
            )
        if event == "execution_interrupted":
            return f"interrupted at node {data['node_id']} ({data['node_type']})"
    return json.dumps(entry["status"], indent=1)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _write_model_paths(models_dir: Path, custom_nodes: Path | None) -> Path:
    for folder in MODEL_FOLDERS:
        (models_dir / folder).mkdir(parents=True, exist_ok=True)
    config = models_dir / "extra_model_paths.yaml"
    # is_default puts these folders first, so files ComfyUI (or our trainer) saves land here too.
    lines = ["tests:", f"  base_path: {json.dumps(str(models_dir))}", "  is_default: true"]
    lines += [f"  {folder}: {folder}" for folder in MODEL_FOLDERS]
    if custom_nodes is not None:
        lines.append(f"  custom_nodes: {json.dumps(str(custom_nodes))}")
    config.write_text("\n".join(lines) + "\n")
    return config


def _threads() -> dict[str, str]:
    """Under pytest-xdist every core already runs a worker: the server then computes on one OpenMP thread, as the
    workers do (conftest), since a second one only spins against the other worker (the graph tests took 3.6x as
    long with two on 2 cores)."""
    return {"OMP_NUM_THREADS": "1"} if os.environ.get("PYTEST_XDIST_WORKER") else {}


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is not None:
        return
    # The server runs in its own process group; end everything it started.
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@contextmanager
def running_comfy_server(
    root: Path, host_dir: Path | None = None, node_packages: Sequence[Path] = ()
) -> Iterator[ComfyServer]:
    """Starts ComfyUI with its folders under `root`, waits until it answers, and always stops it.
    `node_packages` are custom node folders loaded besides the host's, linked into `<root>/custom_nodes`."""
    host_dir = host_dir or comfy_host_path()
    if not (host_dir / "main.py").is_file():
        raise ComfyServerError(f"no ComfyUI at {host_dir}: run `make host` or set COMFYUI_PATH")
    dirs = {name: root / name for name in ("models", "input", "output", "temp", "user", "tmp")}
    for path in dirs.values():
        path.mkdir(parents=True, exist_ok=True)
    custom_nodes = root / "custom_nodes" if node_packages else None
    for package in node_packages:
        custom_nodes.mkdir(exist_ok=True)
        link = custom_nodes / package.name
        if not link.is_symlink():
            link.symlink_to(package, target_is_directory=True)
    port = _free_port()
    command = [
        sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
        "--output-directory", str(dirs["output"]), "--input-directory", str(dirs["input"]),
        "--temp-directory", str(dirs["temp"]), "--user-directory", str(dirs["user"]),
        "--extra-model-paths-config", str(_write_model_paths(dirs["models"], custom_nodes)),
        # Keep the host folder clean (the default database lives in it) and stay offline.
        "--database-url", "sqlite:///:memory:", "--disable-api-nodes",
    ]
    log_path = root / "server.log"
    started = time.monotonic()
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            command, cwd=host_dir, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            # The server is stopped by a signal, which skips atexit: temp files of its nodes stay under root.
            env={**os.environ, "PYTHONUNBUFFERED": "1", "TMPDIR": str(dirs["tmp"]), **_threads()},
            start_new_session=True,
        )
        try:
            server = ComfyServer(
                url=f"http://127.0.0.1:{port}", port=port, host_dir=host_dir, log_path=log_path,
                models_dir=dirs["models"], input_dir=dirs["input"], output_dir=dirs["output"], process=process,
            )
            server.wait_until_ready()
            log.info("ComfyUI answered on %s after %.1f s (log: %s)", server.url, time.monotonic() - started, log_path)
            yield server
        finally:
            _stop(process)


@pytest.fixture(scope="session")
def comfy_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ComfyServer]:
    with running_comfy_server(tmp_path_factory.mktemp("comfy-server"), node_packages=[GRAPH_NODES]) as server:
        yield server
