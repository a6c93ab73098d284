"""Runs queues of real-run benchmark calls (bench/realrun.py) on the GPU machine: one queue per GPU, within one
device call's time, and on the next call on the same warm machine it goes on where the last one stopped.

    python3 bench/device_queue.py bench/queues/next-flux.txt [bench/queues/next-rest.txt ...] --budget 545 --out "$OUT"

A queue file holds one realrun.py call per line, named: `flux-cli-16: --model flux --entry cli --card-gb 16`
(`#` starts a comment). The runner adds `--work`, `--out` and `--time-limit`.

- Lanes: one per GPU (nvidia-smi -L; `--lanes` to choose), each running its queues' lines in order with
  CUDA_VISIBLE_DEVICES set to its GPU and a work folder of its own (its model files are written once and reused
  by its later lines). With more queues than GPUs, queues share lanes in turn.
- Time: a line starts only with at least its realrun `--min-run-seconds` (default 60) of `--budget` left after a
  30 s margin, and is given that rest as realrun's `--time-limit`; a line still running at the end of the budget
  is stopped, so the results are packed within the budget and 20 s. `--budget` is the device call's limit less
  the time to pack and send. A line that cannot start leaves room for a shorter one after it.
- State (`--state`, in /tmp: it lasts as long as the machine stays warm): a line whose runs all ended (trained,
  did not fit or failed) is done and skipped by later calls; a line stopped by the time limit runs again.
- Host: COMFYUI_PATH, else the host scripts/prepare_device.sh packed into .device/comfyui.tar.xz, unpacked once
  per machine into the state's `comfyui` folder (a host folder .device/comfyui is used as it is); the wheels it
  put in .device/whl are installed once per machine into the state's `site` folder, put first on the lines'
  PYTHONPATH (`pip install --no-index --no-deps --target`: the device has no network).
- Output: `<out>/queue-<time>.tgz` with the folder of every line this call ran (realrun's JSON, markdown and run
  logs, the call's own log) and each lane's timeline; `queue-<time>.txt` is the timeline alone.
"""

import argparse
import datetime
import hashlib
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import realrun

REPO = Path(__file__).resolve().parents[1]
DEVICE = REPO / ".device"
UNFINISHED = {"timed out", "not run"}
SET_BY_THE_QUEUE = {"--work", "--out", "--time-limit"}
NAME = re.compile(r"[A-Za-z0-9][\w.-]*")  # a folder name: never "..", never a path
# realrun.py is given this much less than what is left: for its start, and for stopping its run at its limit
# (SIGINT, then up to 20 s). The queue itself stops a line at the end of the budget.
EXIT_MARGIN_SECONDS = 30


@dataclass(frozen=True)
class Line:
    name: str
    arguments: list[str]
    source: str

    def least_seconds(self) -> float:
        """What the line needs at least to be worth starting: its realrun `--min-run-seconds` (default 60)."""
        return realrun.parse_args(self.arguments).min_run_seconds


def read_queue(path: Path) -> list[Line]:
    lines = []
    for number, text in enumerate(path.read_text().splitlines(), 1):
        text = text.split("#", 1)[0].strip()
        if not text:
            continue
        name, colon, arguments = text.partition(":")
        if not colon or not NAME.fullmatch(name.strip()):
            raise ValueError(f"{path}:{number}: expected `name: realrun.py arguments` (a name of letters, digits, "
                             f"'.', '_' and '-' that starts with a letter or digit), got {text!r}")
        lines.append(Line(name.strip(), arguments.split(), f"{path}:{number}"))
    return lines


def check_line(line: Line) -> None:
    """realrun.py's own parser on the line, here rather than after the GPU time it would cost."""
    given = sorted(set(line.arguments) & SET_BY_THE_QUEUE)
    if given:
        raise ValueError(f"{line.source}: {', '.join(given)} is set by the queue; leave it out of the line")
    try:
        realrun.parse_args(line.arguments)
    except SystemExit as error:  # argparse has printed what is wrong
        raise ValueError(f"{line.source}: realrun.py does not take these arguments") from error


def plan_lanes(queues: list[list[Line]], lanes: int) -> list[list[Line]]:
    """Queue i goes to lane i % lanes; queues sharing a lane take turns line by line, so that each keeps its
    order of importance. Names must be unique across all queues (they name the results)."""
    seen: dict[str, str] = {}
    for line in (line for queue in queues for line in queue):
        if line.name in seen:
            raise ValueError(f"{line.source}: the name {line.name!r} is also used at {seen[line.name]}")
        seen[line.name] = line.source
        check_line(line)
    count = min(lanes, len(queues))
    return [[line for turn in itertools.zip_longest(*queues[index::count]) for line in turn if line is not None]
            for index in range(count)]


def gpu_count() -> int:
    try:
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError):
        return 1
    return max(1, sum(line.startswith("GPU ") for line in listing.stdout.splitlines()))


def install_wheels(wheels: Path, state: Path) -> str | None:
    """Installs the wheels into a folder of the state (the image's own environment is left as it is), once per
    machine; returns the folder for PYTHONPATH, or None where there are no wheels."""
    found = sorted(wheels.glob("*.whl")) if wheels.is_dir() else []
    if not found:
        return None
    site, marker = state / "site", state / "wheels-installed"
    if marker.is_file() and marker.read_text().split() == [wheel.name for wheel in found]:
        return str(site)
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--no-compile",
                    "--no-cache-dir", "--upgrade", "--target", str(site), *map(str, found)], check=True)
    marker.write_text("\n".join(wheel.name for wheel in found) + "\n")
    return str(site)


def unpack_host(device: Path, state: Path) -> str | None:
    """The ComfyUI host prepare_device.sh carried: its archive unpacked into a folder of the state once per machine
    (again when the archive changes), else a host folder as it is; None where neither was carried."""
    archive = device / "comfyui.tar.xz"
    if not archive.is_file():
        return str(device / "comfyui") if (device / "comfyui" / "comfy").is_dir() else None
    host, marker = state / "comfyui", state / "host-unpacked"
    stamp = hashlib.sha256(archive.read_bytes()).hexdigest()
    if marker.is_file() and marker.read_text() == stamp:
        return str(host)
    shutil.rmtree(host, ignore_errors=True)
    host.mkdir(parents=True)
    with tarfile.open(archive) as packed:
        packed.extractall(host, filter="data")
    marker.write_text(stamp)
    return str(host)


def finished(results: Path) -> bool:
    """Whether every run of the call ended by itself: one stopped by the time limit, or never started, runs again."""
    documents = list(results.glob("realrun-*.json"))
    if not documents:
        return False
    runs = [run for document in documents for run in json.loads(document.read_text()).get("runs", [])]
    return bool(runs) and not any(run.get("status") in UNFINISHED for run in runs)


class Queue:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.started = time.monotonic()
        self.stamp = datetime.datetime.now().strftime("%H%M%S")
        self.ran: list[str] = []
        self.timelines: list[Path] = []
        self.failed = False
        self.lock = threading.Lock()

    def remaining(self) -> float:
        return self.args.budget - (time.monotonic() - self.started)

    def note(self, timeline: Path, text: str) -> None:
        stamped = f"{datetime.datetime.now():%H:%M:%S} {text}"
        with self.lock:
            print(stamped, flush=True)
            with timeline.open("a") as file:
                file.write(stamped + "\n")

    def run_lane(self, index: int, lane: list[Line], environment: dict) -> None:
        timeline = self.args.state / f"timeline-{self.stamp}-lane{index}.txt"
        with self.lock:
            self.timelines.append(timeline)
        for line in lane:
            try:
                self.run_line(index, line, environment, timeline)
            except Exception as error:  # one line's trouble (a full disk, say) must not lose the other lines
                self.failed = True
                self.note(timeline, f"{line.name}: not done, {type(error).__name__}: {error}")

    def run_line(self, index: int, line: Line, environment: dict, timeline: Path) -> None:
        state = self.args.state
        if (state / "done" / line.name).is_file():
            self.note(timeline, f"{line.name}: done in an earlier call")
            return
        left = self.remaining() - EXIT_MARGIN_SECONDS
        if left < line.least_seconds():
            self.note(timeline, f"{line.name}: not started, {left:.0f} s left for it")
            return
        results = state / "results" / line.name
        shutil.rmtree(results, ignore_errors=True)
        results.mkdir(parents=True)
        command = [sys.executable, str(REPO / "bench" / "realrun.py"), *line.arguments, "--work",
                   str(state / f"lane{index}"), "--out", str(results), "--time-limit", f"{left:.0f}"]
        self.note(timeline, f"{line.name}: start on lane {index} ({left:.0f} s for it)")
        with self.lock:
            self.ran.append(line.name)
        with (results / "realrun-call.log").open("wb") as log:
            process = subprocess.Popen(command, cwd=REPO, env=environment, stdout=log, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, start_new_session=True)
            stopped = realrun.wait_or_stop(process, self.started + self.args.budget)
        code = "stopped at the budget" if stopped else process.returncode
        if code == 0 and finished(results):
            (state / "done").mkdir(exist_ok=True)
            (state / "done" / line.name).write_text(f"{self.stamp}\n")
            self.note(timeline, f"{line.name}: done, rc=0")
        else:
            self.note(timeline, f"{line.name}: not done, rc={code} (runs again next call)")

    def main(self, lanes: list[list[Line]]) -> int:
        args = self.args
        args.state.mkdir(parents=True, exist_ok=True)
        # CUDA numbers the GPUs as nvidia-smi does (realrun reads nvidia-smi for the GPU a lane uses).
        base = dict(os.environ, PYTHONUNBUFFERED="1", CUDA_DEVICE_ORDER="PCI_BUS_ID")
        try:
            site = install_wheels(args.wheels, args.state)
            if site is not None:
                base["PYTHONPATH"] = os.pathsep.join(filter(None, [site, base.get("PYTHONPATH")]))
            if "COMFYUI_PATH" not in base and (host := unpack_host(args.wheels.parent, args.state)) is not None:
                base["COMFYUI_PATH"] = host
            threads = [threading.Thread(target=self.run_lane, name=f"lane{index}",
                                        args=(index, lane, base | {"CUDA_VISIBLE_DEVICES": str(index)}))
                       for index, lane in enumerate(lanes)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        finally:
            self.pack()
        return 1 if self.failed else 0

    def pack(self) -> None:
        out, state = self.args.out, self.args.state
        out.mkdir(parents=True, exist_ok=True)
        timelines = [timeline for timeline in self.timelines if timeline.is_file()]
        (out / f"queue-{self.stamp}.txt").write_text("".join(timeline.read_text() for timeline in timelines))
        with tarfile.open(out / f"queue-{self.stamp}.tgz", "w:gz") as archive:
            for name in sorted(self.ran):
                archive.add(state / "results" / name, arcname=name)
            for timeline in timelines:
                archive.add(timeline, arcname=timeline.name)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("queues", type=Path, nargs="+", help="queue files: `name: realrun.py arguments` per line")
    parser.add_argument("--budget", type=float, default=545.0,
                        help="seconds this call may run lines for (default 545 of a device call's 600)")
    parser.add_argument("--lanes", type=int, default=None, help="lines run side by side, one GPU each "
                        "(default: every GPU nvidia-smi lists)")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp/lora-queue-out")),
                        help="where the packed results go (default $OUT)")
    parser.add_argument("--state", type=Path, default=Path("/tmp/lora-queue"),
                        help="work folders, results and which lines are done, kept between calls")
    parser.add_argument("--wheels", type=Path, default=DEVICE / "whl",
                        help="wheels to install once per machine (default .device/whl)")
    args = parser.parse_args(argv)
    if args.lanes is not None and args.lanes < 1:
        parser.error("--lanes must be at least 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        lanes = plan_lanes([read_queue(path) for path in args.queues], args.lanes or gpu_count())
    except (OSError, ValueError) as error:
        print(f"queue: {error}", file=sys.stderr)
        return 2
    return Queue(args).main(lanes)


if __name__ == "__main__":
    sys.exit(main())
