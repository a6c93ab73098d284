"""The benchmark's code path, on tiny models on the CPU, so it cannot rot (its numbers mean nothing here)."""

import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
import types
import zipfile
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def realrun_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One folder of realrun's tiny model files (`--models`) for the module's real runs: the first run writes them
    through realrun's writers, the later ones load the same files (a writer child process fewer each)."""
    return tmp_path_factory.mktemp("realrun-models")


def test_the_benchmark_runs_both_trainers_in_smoke_mode(comfy_host: Path, tmp_path: Path) -> None:
    results = tmp_path / "bench.json"
    command = [sys.executable, "bench/bench.py", "--smoke", "--models", "flux", "--variants", "bf16",
               "--json", str(results)]
    environment = os.environ | {"COMFYUI_PATH": str(comfy_host), "OMP_NUM_THREADS": "1"}
    finished = subprocess.run(command, cwd=REPO_ROOT, env=environment, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    (row,) = json.loads(results.read_text())["rows"]
    for side in ("ours", "theirs"):
        assert "error" not in row[side], row[side]
        assert row[side]["median_s"] > 0
    assert row["ours"]["forward_flops"] > 0
    assert "Flux dev" in finished.stdout and "ours/theirs" in finished.stdout


def test_the_real_run_bench_trains_through_both_entries_and_records_steps_phases_and_buckets(
        comfy_host: Path, tmp_path: Path, realrun_models: Path) -> None:
    """bench/realrun.py at its CPU scale (--tiny --cpu): files written through its writers and loaded by ComfyUI's
    loaders without a missing key, three aspect-ratio buckets, lora-train and a live ComfyUI server's Train LoRA."""
    work = tmp_path / "realrun"
    command = [sys.executable, "bench/realrun.py", "--tiny", "--cpu", "--card-gb", "8", "--entry", "both",
               "--steps", "9", "--warmup", "2", "--sample-every", "4", "--save-every", "4", "--work", str(work),
               "--models", str(realrun_models)]
    environment = os.environ | {"COMFYUI_PATH": str(comfy_host), "OMP_NUM_THREADS": "1"}
    finished = subprocess.run(command, cwd=REPO_ROOT, env=environment, capture_output=True, text=True, timeout=1200)
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]

    document = json.loads((work / "results" / "realrun-tiny-8gb-both.json").read_text())
    assert document["dataset"]["images"] == 9
    runs = {run["entry"]: run for run in document["runs"]}
    assert set(runs) == {"cli", "node"}
    for entry, run in runs.items():
        assert run["status"] == "ok", (entry, run.get("message"), run.get("log_tail"))
        assert run["load_warnings"] == [], run["load_warnings"]
        assert [step["step"] for step in run["steps"]] == list(range(1, 10))
        assert all(step["seconds"] > 0 for step in run["steps"])
        # One epoch of nine images: every bucket is drawn, and each step knows its bucket.
        assert set(run["buckets"]) == {"128x128", "64x192", "192x64"}
        assert all(step["bucket"] in run["buckets"] for step in run["steps"])
        # Previews and checkpoints at steps 4 and 8 sit between those steps and the next, not inside a step.
        assert [step["step"] for step in run["steps"] if step["between_s"] > 0] == [5, 9]
        assert run["samples"] == 3 and run["checkpoints"] == 2  # at 4 and 8, and the final preview
        for phase in ("loading", "caching", "training", "sampling", "saving"):
            assert run["phases"][phase]["seconds"] > 0, (entry, phase, run["phases"])
        assert run["time_to_first_step_s"] > 0 and run["steady_s_per_step"] > 0
        assert (Path(run["run_dir"]) / "result.json").is_file()
    assert runs["node"]["server_start_s"] > 0
    # The node's LoRA is written into the run's folder, not into the host's loras folder.
    assert list((Path(runs["node"]["run_dir"]) / "server" / "loras").rglob("*.safetensors"))
    assert not list((comfy_host / "models" / "loras").glob("realrun_*"))

    table = (work / "results" / "realrun-tiny-8gb-both.md").read_text()
    assert "| model | entry | card | fits | steady s/step |" in table
    assert "| SD3 (tiny) | cli | CPU | yes |" in table and "| SD3 (tiny) | node | CPU | yes |" in table
    assert table.strip() in finished.stdout


def test_real_run_step_times_leave_out_previews_and_count_compiles() -> None:
    """From probe records with made-up times: a report of two steps shares its gap, a preview between two steps is
    not a step's time, steps in which torch.compile compiled are the compile time, and a phase's peak is exact
    where it raised the overall peak and the sampler's reading where it did not."""
    sys.path.insert(0, str(REPO_ROOT / "bench"))
    import realrun

    gib = 1024**3

    def event(t, kind, step=None, frames=0):
        return {"kind": "event", "t": t, "event": kind, "data": {"step": step} if step else {"compiling": True},
                "frames": frames}

    def segment(phase, t0, t1, peak_start, peak_end, seen, retries=(0, 0), device_allocs=(0, 0)):
        return {"kind": "segment", "phase": phase, "t0": t0, "t1": t1, "allocated_peak_start": peak_start * gib,
                "allocated_peak_end": peak_end * gib, "allocated_seen": seen * gib, "reserved_peak_start": 0,
                "reserved_peak_end": 0, "reserved_seen": 0, "retries_start": retries[0], "retries_end": retries[1],
                "device_allocs_start": device_allocs[0], "device_allocs_end": device_allocs[1]}

    records = [
        event(0.0, "started"), event(10.0, "step", 1, frames=50), event(10.5, "step", 2, frames=50),
        event(11.0, "step", 3, frames=50),
        segment("sampling", 11.1, 13.1, 6.0, 6.0, 4.5, retries=(1, 1), device_allocs=(12, 12)),
        event(13.5, "step", 4, frames=50), event(14.5, "step", 5, frames=50), event(14.5, "step", 6, frames=50),
        event(20.0, "step", 7, frames=60), event(20.5, "step", 8, frames=60),
        segment("training", 0.0, 11.1, 0.0, 6.0, 5.0, retries=(0, 1), device_allocs=(3, 12)),
        segment("training", 13.1, 21.0, 6.0, 6.0, 5.5, retries=(1, 4), device_allocs=(12, 12)),
        *({"kind": "batch", "t": 0.0, "shape": [1, 16, 128, 128]} for _ in range(8)),
    ]
    result = realrun.summarize({"run_start": -5.0, "status": "ok"}, records, [], total_steps=8, warmup=1)

    assert [s["seconds"] for s in result["steps"]] == [10.0, 0.5, 0.5, 0.5, 0.5, 0.5, 5.5, 0.5]
    assert [s["between_s"] for s in result["steps"]][3] == 2.0
    assert result["time_to_first_step_s"] == 15.0
    assert result["steady_s_per_step"] == 0.5
    assert result["buckets"] == ["1024x1024"]
    compiled = result["compile"]
    assert [(e["step"], e["frames"]) for e in compiled["compiling_steps"]] == [(1, 50), (7, 10)]
    assert compiled["seconds"] == 14.5 and compiled["recompiles"] == 1
    assert result["phases"]["training"]["peak_allocated_gib"] == 6.0
    assert result["phases"]["training"]["peak_allocated_exact"] is True
    assert result["phases"]["sampling"]["peak_allocated_gib"] == 4.5
    assert result["phases"]["sampling"]["peak_allocated_exact"] is False
    # The allocator's retries and device allocations, summed over each phase's segments.
    training, sampling = result["phases"]["training"], result["phases"]["sampling"]
    assert (training["allocator_retries"], training["allocator_device_allocs"]) == (4, 9)
    assert (sampling["allocator_retries"], sampling["allocator_device_allocs"]) == (0, 0)


def test_the_real_run_bench_reads_nvidia_smi_of_the_runs_gpu_alone() -> None:
    """nvidia-smi ignores CUDA_VISIBLE_DEVICES: the bench names the runs' GPU to it, so that a run on GPU 1
    beside another on GPU 0 does not read the other's memory."""
    sys.path.insert(0, str(REPO_ROOT / "bench"))
    import realrun

    assert realrun.visible_gpu({"CUDA_VISIBLE_DEVICES": "1"}) == "1"
    assert realrun.visible_gpu({"CUDA_VISIBLE_DEVICES": "3,2"}) == "3"
    assert realrun.visible_gpu({"CUDA_VISIBLE_DEVICES": "GPU-5e1a,GPU-77b0"}) == "GPU-5e1a"
    assert realrun.visible_gpu({}) == "0"


def test_the_real_run_writes_sdxl_checkpoints_whole_on_every_host(comfy_host: Path) -> None:
    """The SDXL file holds the UNet, the encoders and the VAE under the names ComfyUI's checkpoint loader reads.
    ComfyUI 0.33 changed `state_dict_for_saving` to take the UNet as its first argument; called as on 0.3.75 it
    wrote the encoders as the UNet, which 0.33 then could not detect."""
    sys.path.insert(0, str(REPO_ROOT / "bench"))
    import comfy.sdxl_clip
    import realrun_files
    import torch
    from tiny_models import build_sdxl

    model = build_sdxl().model
    with torch.device("meta"):
        clip = comfy.sdxl_clip.SDXLClipModel(device="meta", dtype=torch.float16).state_dict()
    vae = {"encoder.conv_in.weight": torch.ones(2, 3, 3, 3), "decoder.conv_out.bias": torch.zeros(3)}
    written = realrun_files.checkpoint_state_dict(model, dict(clip), dict(vae))  # ComfyUI renames in place

    unet = model.diffusion_model.state_dict()
    assert {k.removeprefix("model.diffusion_model.") for k in written if k.startswith("model.diffusion_model.")} \
        == set(unet)
    assert all(torch.equal(written[f"model.diffusion_model.{k}"], v) for k, v in unet.items())
    assert written["first_stage_model.encoder.conv_in.weight"] is vae["encoder.conv_in.weight"]
    encoders = [k for k in written if k.startswith("conditioner.embedders.")]
    assert any(k.startswith("conditioner.embedders.0.transformer.") for k in encoders)  # CLIP-L
    assert any(k.startswith("conditioner.embedders.1.model.") for k in encoders)  # CLIP-G, OpenCLIP names
    assert len(written) == len(unet) + len(vae) + len(encoders)


def test_the_real_run_bench_with_dop_runs_each_configuration_without_and_with_it(comfy_host: Path, tmp_path: Path,
                                                                                  realrun_models: Path) -> None:
    """`--dop` (differential output preservation's cost per step): two lora-train runs at the CPU scale, the second
    with train.diff_output_preservation on, and the table's line comparing their steady step times."""
    work = tmp_path / "realrun"
    command = [sys.executable, "bench/realrun.py", "--tiny", "--cpu", "--card-gb", "8", "--entry", "cli", "--dop",
               "--steps", "5", "--warmup", "1", "--sample-every", "5", "--save-every", "5", "--work", str(work),
               "--models", str(realrun_models)]
    environment = os.environ | {"COMFYUI_PATH": str(comfy_host), "OMP_NUM_THREADS": "1"}
    finished = subprocess.run(command, cwd=REPO_ROOT, env=environment, capture_output=True, text=True, timeout=1200)
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]

    document = json.loads((work / "results" / "realrun-tiny-8gb-cli-dop.json").read_text())
    assert [(run["entry"], run["dop"], run["status"]) for run in document["runs"]] == [
        ("cli", False, "ok"), ("cli", True, "ok")]
    with_dop = Path(document["runs"][1]["run_dir"]) / "config.yaml"
    assert json.loads(with_dop.read_text())["train"]["diff_output_preservation"] is True
    table = (work / "results" / "realrun-tiny-8gb-cli-dop.md").read_text()
    assert "| SD3 (tiny) | cli + DOP | CPU | yes |" in table
    plain, dop = (run["steady_s_per_step"] for run in document["runs"])
    assert f"- DOP, cli 8 GB: {dop:.3f} s/step against {plain:.3f} without: {dop - plain:+.3f} s per step" in table


def test_the_device_queue_runs_a_line_once_across_calls_and_packs_its_results(comfy_host: Path, tmp_path: Path,
                                                                              realrun_models: Path) -> None:
    """bench/device_queue.py as a GPU sitting runs it, here on realrun's CPU configuration, with the line
    `--optimizer adamw --square` (what the default 8-bit optimizer and the aspect-ratio buckets cost a step). The
    first call runs the line and packs its results; the second, on the same state as on a warm machine, skips it
    and leaves the line it has no time for."""
    line = ("tiny-adamw-square: --tiny --cpu --card-gb 8 --entry cli --optimizer adamw --square --steps 4 "
            f"--warmup 1 --sample-every 4 --save-every 4 --min-run-seconds 1 --models {realrun_models}")
    sitting = tmp_path / "sitting.txt"
    sitting.write_text(f"# the sitting's queue\n{line}\n")
    longer = tmp_path / "longer.txt"
    longer.write_text("tiny-long: --tiny --cpu --card-gb 8 --entry cli --min-run-seconds 900  # more than the budget\n")
    environment = os.environ | {"COMFYUI_PATH": str(comfy_host), "OMP_NUM_THREADS": "1"}

    def call(out: Path, *queues: Path) -> str:
        command = [sys.executable, "bench/device_queue.py", *map(str, queues), "--budget", "600", "--lanes", "1",
                   "--out", str(out), "--state", str(tmp_path / "state"), "--wheels", str(tmp_path / "no-wheels")]
        finished = subprocess.run(command, cwd=REPO_ROOT, env=environment, capture_output=True, text=True,
                                  timeout=1200)
        assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
        return finished.stdout

    first = call(tmp_path / "out1", sitting)
    assert "tiny-adamw-square: done, rc=0" in first
    (archive,) = (tmp_path / "out1").glob("queue-*.tgz")
    with tarfile.open(archive) as packed:
        packed.extractall(tmp_path / "unpacked", filter="data")
    results = tmp_path / "unpacked" / "tiny-adamw-square"
    document = json.loads((results / "realrun-tiny-8gb-cli-adamw-square.json").read_text())
    host_version = (comfy_host / "comfyui_version.py").read_text().split('"')[1]
    assert document["comfyui"] == host_version
    assert f"ComfyUI {host_version}" in (results / "realrun-tiny-8gb-cli-adamw-square.md").read_text()
    assert document["optimizer"] == "adamw"
    assert len(document["dataset"]["buckets"]) == 1 and document["dataset"]["images"] == 9
    run = document["runs"][0]
    assert run["status"] == "ok"
    assert json.loads((Path(run["run_dir"]) / "config.yaml").read_text())["train"]["optimizer"] == "adamw"
    assert run["buckets"] == ["128x128"]
    assert len(run["steps"]) == 4
    assert "tiny-adamw-square: done, rc=0" in (results.parent / next(
        name for name in os.listdir(results.parent) if name.startswith("timeline-"))).read_text()

    second = call(tmp_path / "out2", sitting, longer)
    assert "tiny-adamw-square: done in an earlier call" in second
    assert re.search(r"tiny-long: not started, \d+ s left", second)
    (archive,) = (tmp_path / "out2").glob("queue-*.tgz")
    with tarfile.open(archive) as packed:
        assert [name for name in packed.getnames() if not name.startswith("timeline-")] == []


def test_the_device_queue_refuses_a_line_it_cannot_run_before_any_gpu_time(tmp_path: Path) -> None:
    """A queue's mistakes are found when it is read, each naming its file and line; queues sharing a GPU take
    turns so that each keeps its order."""
    sys.path.insert(0, str(REPO_ROOT / "bench"))
    import device_queue

    def planned(*texts: str, lanes: int = 1) -> list[list[str]]:
        queues = []
        for index, text in enumerate(texts):
            (tmp_path / f"q{index}.txt").write_text(text)
            queues.append(device_queue.read_queue(tmp_path / f"q{index}.txt"))
        return [[line.name for line in lane] for lane in device_queue.plan_lanes(queues, lanes)]

    a = "a1: --model flux --card-gb 16\na2: --model sdxl --card-gb 8\na3: --model sd35m\n"
    b = "b1: --model sd35l --entry node\n"
    assert planned(a, b) == [["a1", "b1", "a2", "a3"]]
    assert planned(a, b, lanes=2) == [["a1", "a2", "a3"], ["b1"]]
    mistakes = {
        "--model flux --card-gb 16\n": "q0.txt:1: expected `name: realrun.py arguments`",
        "..: --model flux\n": "q0.txt:1: expected `name: realrun.py arguments`",
        "a1: --model flux\n\n# note\na1: --model sdxl\n": "q0.txt:4: the name 'a1' is also used at",
        "a1: --model flux --time-limit 100\n": "q0.txt:1: --time-limit is set by the queue",
        "a1: --model flux --card-gb sixteen\n": "q0.txt:1: realrun.py does not take these arguments",
        "a1: --model flux --entry cli --disable-cuda-malloc\n": "q0.txt:1: realrun.py does not take these arguments",
    }
    for text, message in mistakes.items():
        with pytest.raises(ValueError, match=re.escape(message)):
            planned(text)
    # The repository's queues, which the next GPU sitting runs as they are.
    shipped = [device_queue.read_queue(path) for path in sorted((REPO_ROOT / "bench" / "queues").glob("*.txt"))]
    assert len(shipped) == 5 and all(shipped)
    for lane in device_queue.plan_lanes(shipped, 1):
        for line in lane:
            device_queue.check_line(line)


def test_the_device_queue_runs_again_a_line_the_time_limit_cut_short(comfy_host: Path, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A line is done once each of its runs ended by itself (trained, did not fit, failed); a run the time limit
    stopped or never started makes the next call run the line again. A node run whose ComfyUI server had not
    answered when the time ran out is such a run, not a failure."""
    sys.path.insert(0, str(REPO_ROOT / "bench"))
    import device_queue
    import realrun

    def results(*statuses: str) -> Path:
        folder = tmp_path / "-".join(statuses or ("none",))
        folder.mkdir()
        runs = [{"status": status} for status in statuses]
        (folder / "realrun-sdxl-8gb-cli.json").write_text(json.dumps({"runs": runs}))
        return folder

    assert device_queue.finished(results("ok", "did not fit", "failed"))
    assert not device_queue.finished(results("ok", "timed out"))
    assert not device_queue.finished(results("not run"))
    assert not device_queue.finished(results())
    assert not device_queue.finished(tmp_path / "no-results")

    monkeypatch.setenv("COMFYUI_PATH", str(comfy_host))
    bench = types.SimpleNamespace(args=types.SimpleNamespace(cpu=True, models=tmp_path / "models",
                                                             disable_cuda_malloc=False))
    environment = os.environ | {"COMFYUI_PATH": str(comfy_host), "OMP_NUM_THREADS": "1"}
    outcome = realrun.Bench.run_node(bench, tmp_path / "run", environment, deadline=time.monotonic(), dop=False)
    assert outcome["status"] == "timed out", outcome
    assert "did not answer before the time limit" in outcome["message"]


def test_a_bench_stopped_while_it_waits_for_a_run_stops_the_run_too(tmp_path: Path) -> None:
    """The runs (lora-train, the ComfyUI server) are in sessions of their own; a bench stopped while it waits
    for one (Ctrl-C, the device queue's budget) must not leave it running on the GPU."""
    sys.path.insert(0, str(REPO_ROOT / "bench"))
    import realrun

    run = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, 0.5)
    try:
        with pytest.raises(KeyboardInterrupt):
            realrun.wait_or_stop(run, time.monotonic() + 600)
        outlived_the_bench = run.poll() is None
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if run.poll() is None:
            run.kill()
    assert not outlived_the_bench
    assert run.returncode == -signal.SIGINT  # stopped as the bench stops a run: SIGINT first


def test_the_device_queue_installs_the_carried_wheels_once_into_its_own_folder(tmp_path: Path) -> None:
    """The device has no network: .device/whl's wheels go into the state's site folder (for the lines'
    PYTHONPATH) with pip offline, once per machine, and again when the wheels change."""
    sys.path.insert(0, str(REPO_ROOT / "bench"))
    import device_queue

    wheels, state = tmp_path / "whl", tmp_path / "state"
    wheels.mkdir()
    state.mkdir()

    def build_wheel(name: str) -> None:
        files = {f"{name}.py": "ANSWER = 42\n",
                 f"{name}-1.0.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n",
                 f"{name}-1.0.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                               "Tag: py3-none-any\n"}
        record = f"{name}-1.0.dist-info/RECORD"
        files[record] = "".join(f"{path},,\n" for path in [*files, record])
        with zipfile.ZipFile(wheels / f"{name}-1.0-py3-none-any.whl", "w") as wheel:
            for path, text in files.items():
                wheel.writestr(path, text)

    assert device_queue.install_wheels(wheels, state) is None  # nothing carried: nothing to put on the path
    build_wheel("carried_one")
    site = device_queue.install_wheels(wheels, state)
    probe = [sys.executable, "-c", "import carried_one; print(carried_one.ANSWER)"]
    answer = subprocess.run(probe, env=os.environ | {"PYTHONPATH": site}, capture_output=True, text=True)
    assert answer.stdout.strip() == "42", answer.stderr

    (Path(site) / "carried_one.py").unlink()  # a second call on the same machine installs nothing
    assert device_queue.install_wheels(wheels, state) == site
    assert not (Path(site) / "carried_one.py").exists()
    build_wheel("carried_two")  # other wheels: installed again
    device_queue.install_wheels(wheels, state)
    assert (Path(site) / "carried_one.py").is_file() and (Path(site) / "carried_two.py").is_file()


def test_the_device_queue_unpacks_the_carried_host_once_and_points_the_lines_at_it(tmp_path: Path) -> None:
    """prepare_device.sh packs the trimmed host (the carry is limited to 64 MiB): the queue unpacks it into the
    state once per machine, again when the archive changes, and a host folder carried as it is is used as it is."""
    sys.path.insert(0, str(REPO_ROOT / "bench"))
    import device_queue

    device, state = tmp_path / "device", tmp_path / "state"
    (device / "comfyui" / "comfy").mkdir(parents=True)
    state.mkdir()
    assert device_queue.unpack_host(device, state) == str(device / "comfyui")
    assert device_queue.unpack_host(tmp_path / "nothing", state) is None

    def pack(version: str) -> None:
        staged = tmp_path / "staged"
        (staged / "comfy").mkdir(parents=True, exist_ok=True)
        (staged / "comfyui_version.py").write_text(f'__version__ = "{version}"\n')
        with tarfile.open(device / "comfyui.tar.xz", "w:xz") as archive:
            archive.add(staged, arcname=".")

    pack("0.33.0")
    host = Path(device_queue.unpack_host(device, state))
    assert host == state / "comfyui" and (host / "comfy").is_dir()
    assert '"0.33.0"' in (host / "comfyui_version.py").read_text()
    (host / "comfyui_version.py").unlink()  # a second call on the same machine unpacks nothing
    assert device_queue.unpack_host(device, state) == str(host)
    assert not (host / "comfyui_version.py").exists()
    pack("0.34.0")  # another host: unpacked again, in place of the first
    assert device_queue.unpack_host(device, state) == str(host)
    assert '"0.34.0"' in (host / "comfyui_version.py").read_text()


def test_the_real_run_bench_can_start_the_server_with_the_native_allocator(comfy_host: Path, tmp_path: Path) -> None:
    """`--disable-cuda-malloc` (what a user who starts ComfyUI with it gets: recorded steps, which the engine does
    not record under cudaMallocAsync) reaches the node entry's server: ComfyUI's /system_stats shows its argv."""
    sys.path.insert(0, str(REPO_ROOT / "bench"))
    import realrun

    environment = os.environ | {"COMFYUI_PATH": str(comfy_host), "OMP_NUM_THREADS": "1"}
    server = realrun.ComfyServer(tmp_path / "server", tmp_path / "models", environment, cpu=True,
                                 extra_args=("--disable-cuda-malloc",))
    try:
        server.start(time.monotonic() + 300)
        argv = server.request("GET", "/system_stats")["system"]["argv"]
    finally:
        server.stop()
    assert "--disable-cuda-malloc" in argv and "--cpu" in argv


def test_the_block_swap_bench_measures_copies_and_compute_per_block_kind(comfy_host: Path, tmp_path: Path) -> None:
    results = tmp_path / "blockswap.json"
    command = [sys.executable, "bench/blockswap.py", "--smoke", "--models", "flux", "--weights", "bf16",
               "--repeats", "2", "--json", str(results)]
    environment = os.environ | {"COMFYUI_PATH": str(comfy_host), "OMP_NUM_THREADS": "1"}
    finished = subprocess.run(command, cwd=REPO_ROOT, env=environment, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    (result,) = json.loads(results.read_text())["results"]
    kinds = result["per_kind"]
    assert set(kinds) == {"DoubleStreamBlock", "SingleStreamBlock"}
    for kind in kinds.values():
        assert kind["bytes"] > 0 and kind["copy_ms"] > 0 and kind["forward_ms"] > 0 and kind["backward_ms"] > 0
    assert "| Flux dev | bfloat16 | DoubleStreamBlock |" in finished.stdout


def test_the_simulated_card_reports_the_same_free_memory_once_the_rest_of_the_gpu_is_held(tmp_path: Path) -> None:
    """The probe's card simulation (a 12 GiB card on a 141 GiB GPU, as on the H200): `mem_get_info` reports the
    card's size and the free memory within it, the same before the probe takes the memory beyond the card from
    the driver and after (then the GPU's free memory is the card's); where the GPU lacks that much free memory
    the probe holds nothing and notes why. No GPU here: the memory readings are made up."""
    sys.path.insert(0, str(REPO_ROOT / "bench"))
    import types

    import realrun
    import realrun_probe

    gib = 1024**3
    readings = {"free": 137 * gib, "total": 141 * gib}
    memory_module = types.SimpleNamespace(mem_get_info=lambda device=None: (readings["free"], readings["total"]))
    probe = realrun_probe.Probe(str(tmp_path / "probe.jsonl"), card_gib=12, reserve_gib=None)
    probe.report_card_size(memory_module)
    assert memory_module.mem_get_info() == (8 * gib, 12 * gib)

    probe.held_beyond_card = 129 * gib
    readings["free"] = 8 * gib
    assert memory_module.mem_get_info() == (8 * gib, 12 * gib)

    # nvidia-smi sees the held memory as used: the bench takes it off the readings made after it was taken.
    setup = {"t": 5.0, "held_beyond_card_gib": 129.0}
    assert realrun.without_held_memory([(1.0, 0.5), (6.0, 137.0)], setup) == [(1.0, 0.5), (6.0, 8.0)]
    assert realrun.without_held_memory([(6.0, 9.0)], {"t": 5.0}) == [(6.0, 9.0)]

    probe.held_beyond_card = 0
    assert probe._hold_beyond_card(None, None, free=100 * gib, total=141 * gib) == 0
    notes = [json.loads(line) for line in (tmp_path / "probe.jsonl").read_text().splitlines()]
    assert "only the allocator's cap simulates it" in notes[-1]["text"]
