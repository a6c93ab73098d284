"""Faults a clumsy or hostile user (or the machine) brings, one test per row of issue 14 that this file
covers: each reproduces the fault for real where that can be done on a CPU machine, asserts the message
the user reads and that every file saved before still loads.

Rows 1-4, 6, 12-14 and the out-of-memory step. Real faults: a full tmpfs for the disk, two processes
saving into one folder, a writer process killed with SIGKILL mid-save, crafted checkpoint files, a live
ComfyUI for `resume_from`. Stand-ins where the fault needs a GPU are named in their test.
"""

import contextlib
import gc
import json
import logging
import math
import os
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path

import folder_paths
import pytest
import safetensors.torch
import torch
from graph_data import write_dataset
from live_server import ComfyServer
from test_export import CancelAt, samples, train_config, weights_of
from test_graph import run, tiny_loader, trainer_events, training_graph, unique
from tiny_models import MODEL_FACTORIES

import trainer_core.job
import trainer_core.trainer
from trainer_core import export, headless
from trainer_core.config import ConfigError, LoraConfig, SaveConfig, TrainConfig
from trainer_core.job import JobHook, TrainingFailed, TrainingJob
from trainer_core.trainer import Trainer

CHILD = Path(__file__).resolve().parent / "fault_child.py"
STARTED_AT = 1_700_000_000.0


def trainer_for(patcher, lora: LoraConfig, config: TrainConfig | None = None, **overrides) -> Trainer:
    return Trainer(patcher, samples(patcher), lora, config or train_config(**overrides))


def run_job(trainer, hooks) -> list:
    """Runs the job to its end; returns its events (the last is "done" or "error")."""
    job = TrainingJob(trainer, hooks)
    for hook in hooks:
        if isinstance(hook, CancelAt):
            hook.job = job
    with job:
        events = list(job.events())
    return events


def saved(events) -> list[tuple[str, int]]:
    return [(e.data["kind"], e.data["step"]) for e in events if e.kind == "saved"]


def assert_loads(checkpoint: Path, step: int) -> None:
    """The checkpoint's resume state and its LoRA file both read back, at `step`."""
    weights, state = export.load_checkpoint(checkpoint)
    assert state["step"] == step and all(torch.isfinite(w).all() for w in weights.values())
    (lora,) = checkpoint.glob("*-step*.safetensors")
    assert export.load_lora_file(lora).layers


# -- row 1: a run owns its checkpoints -----------------------------------------------------------------


def test_a_new_run_with_a_used_name_keeps_the_old_runs_checkpoints_and_resumes_its_own(tmp_path, caplog):
    patcher = MODEL_FACTORIES["sd3"]()
    lora = LoraConfig(rank=2)
    save = SaveConfig(name="reused", every=2, keep_last=3, output_dir=str(tmp_path))
    root = export.checkpoints_folder(save)
    old_run = export.CheckpointHook(save)
    run_job(trainer_for(patcher, lora, steps=9), [old_run])
    assert [p.name for p in export.list_checkpoints(root)] == ["step-000004", "step-000006", "step-000008"]

    # A fresh run of the same name, stopped at step 2: today's keep_last deleted its checkpoint at once.
    new_run = export.CheckpointHook(SaveConfig(name="reused", every=0, keep_last=3, output_dir=str(tmp_path)))
    with caplog.at_level(logging.WARNING, logger="trainer_core.export"):
        events = run_job(trainer_for(patcher, lora, steps=8), [new_run, CancelAt(2)])
    assert saved(events) == [("checkpoint", 2)]
    stopped = Path(next(e.data["path"] for e in events if e.kind == "saved"))
    assert_loads(stopped, 2)
    aside = root / f"run-{old_run.run_id}"
    assert [p.name for p in export.list_checkpoints(aside)] == ["step-000004", "step-000006", "step-000008"]
    for step, checkpoint in zip((4, 6, 8), export.list_checkpoints(aside), strict=True):
        assert_loads(checkpoint, step)
    (warning,) = [r.getMessage() for r in caplog.records if "another run" in r.getMessage()]
    assert str(aside) in warning and "resume_from" in warning

    # `latest` is the new run's; resuming continues its run id and leaves the old run's alone.
    resumed_trainer = trainer_for(patcher, lora, steps=4)
    resumed = export.resume(resumed_trainer, root)
    assert (resumed.folder, resumed.run, resumed_trainer.state.step) == (stopped, new_run.run_id, 2)
    hook = export.CheckpointHook(SaveConfig(name="reused", every=1, keep_last=3, output_dir=str(tmp_path)),
                                 resumed=resumed)
    run_job(resumed_trainer, [hook])
    assert hook.run_id == new_run.run_id
    assert [p.name for p in export.list_checkpoints(root)] == ["step-000002", "step-000003"]
    assert {export.run_of(p) for p in export.list_checkpoints(root)} == {new_run.run_id}
    assert sorted(p.name for p in root.iterdir()) == ["run-" + old_run.run_id, "step-000002", "step-000003"]
    assert len(export.list_checkpoints(aside)) == 3


# -- row 2: a failed final write leaves a checkpoint ---------------------------------------------------


@pytest.fixture
def full_disk(tmp_path):
    """A real, small tmpfs, filled to the last byte by a file that `free()` removes."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")

    class Disk:
        path = mount

        @staticmethod
        def fill() -> None:
            handle = os.open(mount / "filler", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
            try:
                with contextlib.suppress(OSError):  # ENOSPC: full
                    while True:
                        os.write(handle, b"\0" * 4096)
            finally:
                os.close(handle)

        @staticmethod
        def free() -> None:
            (mount / "filler").unlink()

    try:
        yield Disk
    finally:
        gc.collect()  # tensors read from the disk may map its files
        subprocess.run(["umount", "--lazy", str(mount)], check=True)


class FillDisk(JobHook):
    def __init__(self, disk, step: int):
        self.disk, self.every = disk, step

    def on_step(self, trainer):
        self.disk.fill()
        return []


@pytest.mark.parametrize("full", ["loras folder", "loras and output folders"])
def test_a_full_disk_at_the_final_write_keeps_the_trained_steps_and_names_them(full, full_disk, tmp_path,
                                                                                monkeypatch):
    patcher = MODEL_FACTORIES["sd3"]()
    lora = LoraConfig(rank=2)
    loras = full_disk.path / "loras"
    loras.mkdir()
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "loras", ([str(loras)], {".safetensors"}))
    output = full_disk.path if full == "loras and output folders" else tmp_path / "out"
    save = SaveConfig(name="full", every=1, keep_last=2, dtype="fp32", output_dir=str(output))
    root = export.checkpoints_folder(save)
    trainer = trainer_for(patcher, lora, steps=3)
    hook = export.CheckpointHook(save)
    # The disk fills after step 2's checkpoint (the hooks run in order).
    events = run_job(trainer, [hook, FillDisk(full_disk, 2)])
    error = events[-1]
    assert error.kind == "error"
    message = error.data["message"]
    assert "the LoRA of step 3 could not be written" in message and "No space left on device" in message
    assert not any(loras.rglob("*.safetensors"))
    if full == "loras folder":
        final = root / "step-000003"
        assert f"saved in the checkpoint {final}" in message and "resume from it" in message
        assert_loads(final, 3)
        full_disk.free()
        # Resuming a checkpoint of the last step writes the LoRA at once.
        resumed_trainer = trainer_for(patcher, lora, steps=3)
        resumed = export.resume(resumed_trainer, root)
        events = run_job(resumed_trainer, [export.CheckpointHook(save, resumed=resumed)])
        assert saved(events) == [("lora", 3)]
        written = export.load_lora_file(loras / "full" / "full.safetensors")
        checkpointed = export.load_lora_file(final / export.checkpoint_lora_name("full", 3))
        assert all(torch.equal(written.layers[k].up, checkpointed.layers[k].up) for k in checkpointed.layers)
    else:
        newest = root / "step-000002"
        assert "nor a checkpoint of it" in message and f"the newest checkpoint of this run is {newest}" in message
        assert [p.name for p in export.list_checkpoints(root)] == ["step-000001", "step-000002"]
        assert_loads(newest, 2)
        assert_loads(root / "step-000001", 1)


# -- row 3: two processes saving one name --------------------------------------------------------------


def test_two_processes_saving_one_name_into_one_folder_lose_nothing(tmp_path):
    saves = 40
    children = [
        subprocess.Popen([sys.executable, str(CHILD), "save-loop", str(tmp_path), "shared", str(saves)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outputs = [child.communicate(timeout=600) for child in children]
    for child, (out, err) in zip(children, outputs, strict=True):
        assert child.returncode == 0 and out.strip() == "done", err[-3000:]
    root = tmp_path / "shared" / "checkpoints"
    checkpoints = export.list_checkpoints(root) + [p for aside in root.glob("run-*")
                                                   for p in export.list_checkpoints(aside)]
    runs = {export.run_of(p) for p in checkpoints}
    assert len(runs) == 2
    for run_id in runs:
        own = [p for p in checkpoints if export.run_of(p) == run_id]
        # Each run kept its last two (keep_last=2), wherever the other run's saves moved them.
        assert sorted(p.name for p in own) == [f"step-{saves - 1:06d}", f"step-{saves:06d}"]
        for checkpoint in own:
            assert_loads(checkpoint, int(checkpoint.name[5:]))
    assert not list(root.rglob("*.tmp"))


# -- row 4: non-finite weights are never saved ----------------------------------------------------------


class Poison(JobHook):
    """Turns one LoRA weight into NaN after a step: what an update that overflowed leaves (a learning rate
    of inf or 1e38, which the config now refuses, did exactly this)."""

    def __init__(self, step: int):
        self.every = step

    def on_step(self, trainer):
        next(trainer.network.parameters()).data[0] = float("nan")
        return []


def test_non_finite_weights_are_never_saved_and_the_last_good_checkpoint_is_kept(tmp_path):
    patcher = MODEL_FACTORIES["sd3"]()
    save = SaveConfig(name="nan", every=1, keep_last=1, output_dir=str(tmp_path))
    events = run_job(trainer_for(patcher, LoraConfig(rank=2), steps=4), [Poison(2), export.CheckpointHook(save)])
    root = export.checkpoints_folder(save)
    assert saved(events) == [("checkpoint", 1)]
    message = events[-1].data["message"]
    assert events[-1].kind == "error"
    assert "not finite (NaN or inf) at step 2" in message and "were not saved" in message
    assert f"the last good checkpoint, {root / 'step-000001'}, is kept" in message
    assert "train.learning_rate" in message
    assert [p.name for p in export.list_checkpoints(root)] == ["step-000001"]
    assert_loads(root / "step-000001", 1)


@pytest.mark.parametrize("lr", [math.inf, math.nan, 1e38, 11.0, -1e-4])
def test_a_learning_rate_that_cannot_train_is_refused_naming_the_field(lr):
    with pytest.raises(ConfigError, match=r"^train\.learning_rate: must be a number > 0 and <= 10 .* got "):
        TrainConfig(learning_rate=lr)
    assert TrainConfig(learning_rate=1.0).learning_rate == 1.0  # Prodigy's


# -- row 6: damaged and mismatched checkpoints -----------------------------------------------------------


def rewrite_json(folder: Path, change) -> None:
    path = folder / "resume.json"
    header = json.loads(path.read_text())
    path.write_text(json.dumps(change(header)))


def with_trainer_step(step):
    def change(header):
        header["state"]["trainer"]["step"] = step
        return header

    return change


def as_if_trained_on_a_gpu(folder: Path) -> None:
    """The noise generator's state as a CUDA generator keeps it (seed and offset, 16 bytes)."""
    header = json.loads((folder / "resume.json").read_text())
    name = header["state"]["trainer"]["generator"][export.TENSOR]
    tensors = safetensors.torch.load_file(folder / "resume.safetensors")
    tensors[name] = torch.zeros(16, dtype=torch.uint8)
    safetensors.torch.save_file(tensors, folder / "resume.safetensors")


CRAFTED = {
    "truncated json": (lambda f: (f / "resume.json").write_text('{"format": 1, "st'),
                       "is damaged: resume.json cannot be read"),
    "json list": (lambda f: (f / "resume.json").write_text("[1, 2]"), "is damaged: resume.json does not hold"),
    "flipped tensor bytes": (lambda f: (f / "resume.safetensors").write_bytes(b"\xff" * 64),
                             "is damaged: resume.safetensors cannot be read"),
    "tensor file of another checkpoint": (lambda f: safetensors.torch.save_file({"x": torch.ones(1)},
                                                                                f / "resume.safetensors"),
                                          "do not fit together"),
    "negative step": (lambda f: rewrite_json(f, with_trainer_step(-2)), "its step is -2, not a whole number"),
    "step past the run": (lambda f: rewrite_json(f, with_trainer_step(10**30)), "past this run's train.steps"),
    "trained on a GPU": (as_if_trained_on_a_gpu, "was trained on another kind of device than this run's (cpu)"),
}
MISMATCHED = {
    "optimizer": ({"optimizer": "adamw8bit"}, "trained with train.optimizer 'adamw', this run uses 'adamw8bit': set "
                                              "train.optimizer to 'adamw'"),
    "precision": ({"precision": "fp16"}, "trained with train.precision 'fp32', this run uses 'fp16'"),
    "rank": ({"lora": LoraConfig(rank=4)}, "trained with lora.rank 2, this run uses 4"),
    "family": ({"family": "flux_dev"}, "is of a LoRA for sd3.5_medium; this model is flux1_dev"),
}


@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory) -> Path:
    patcher = MODEL_FACTORIES["sd3"]()
    save = SaveConfig(name="good", output_dir=str(tmp_path_factory.mktemp("good")))
    events = run_job(trainer_for(patcher, LoraConfig(rank=2), steps=4), [export.CheckpointHook(save), CancelAt(2)])
    return Path(next(e.data["path"] for e in events if e.kind == "saved"))


@pytest.mark.parametrize("case", list(CRAFTED) + list(MISMATCHED))
def test_a_damaged_or_mismatched_checkpoint_is_refused_naming_its_folder_before_touching_the_run(
        case, good_checkpoint, tmp_path):
    checkpoint = tmp_path / "checkpoints" / "step-000002"
    shutil.copytree(good_checkpoint, checkpoint)
    lora, family, overrides = LoraConfig(rank=2), "sd3", {}
    if case in CRAFTED:
        CRAFTED[case][0](checkpoint)
        expected = CRAFTED[case][1]
    else:
        changes, expected = MISMATCHED[case]
        lora = changes.get("lora", lora)
        family = changes.get("family", family)
        overrides = {k: v for k, v in changes.items() if k not in ("lora", "family")}
    patcher = MODEL_FACTORIES[family]()
    trainer = trainer_for(patcher, lora, steps=4, **overrides)
    before = weights_of(trainer)
    with pytest.raises(ValueError) as refused:  # export.CheckpointError
        export.resume(trainer, checkpoint.parent)
    assert f"checkpoint {checkpoint}" in str(refused.value) and expected in str(refused.value)
    # Nothing of the run changed, and a save from it is a plain step-000000 of its own.
    assert trainer.state.step == 0 and all(torch.equal(before[k], v) for k, v in weights_of(trainer).items())
    event = export.CheckpointHook(SaveConfig(name="after", output_dir=str(tmp_path))).on_step(trainer)[0]
    assert Path(event.data["path"]).name == "step-000000"
    assert_loads(good_checkpoint, 2)


# -- row 12: the umask's permissions -------------------------------------------------------------------


@pytest.mark.parametrize("umask, file_mode, folder_mode", [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750)])
def test_loras_checkpoints_and_cache_files_get_the_umasks_permissions(umask, file_mode, folder_mode, tmp_path):
    patcher = MODEL_FACTORIES["sd3"]()
    trainer = trainer_for(patcher, LoraConfig(rank=2), steps=2)
    previous = os.umask(umask)
    try:
        name = f"modes-{umask:o}"
        lora = export.loras_folder() / export.save_lora(trainer, SaveConfig(name=name), STARTED_AT)
        event = export.CheckpointHook(SaveConfig(name=name, output_dir=str(tmp_path))).on_step(trainer)[0]
        checkpoint = Path(event.data["path"])
        # The dataset cache writes its entries with this writer (data.py).
        cache_entry = tmp_path / "cache" / "entry.safetensors"
        export.write_safetensors_atomic(cache_entry, {"latents": torch.ones(2)})
    finally:
        os.umask(previous)

    def mode(path: Path) -> int:
        return stat.S_IMODE(path.stat().st_mode)

    assert [mode(p) for p in (lora, cache_entry, *checkpoint.iterdir())] == [file_mode] * 5
    assert [mode(p) for p in (lora.parent, checkpoint, checkpoint.parent)] == [folder_mode] * 3


# -- row 13: temp files of a killed save ----------------------------------------------------------------


def start_holding_writer(path: Path) -> subprocess.Popen:
    """A process in the middle of saving `path` with the pack's writer: its temp file is written, the
    rename has not happened."""
    child = subprocess.Popen([sys.executable, str(CHILD), "hold", str(path)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = child.stdout.readline()
    assert line.strip() == "writing", child.stderr.read()[-3000:]
    return child


def test_temp_files_of_a_killed_save_are_removed_by_the_next_save_but_not_those_of_a_live_one(tmp_path):
    patcher = MODEL_FACTORIES["sd3"]()
    trainer = trainer_for(patcher, LoraConfig(rank=2), steps=2)
    save = SaveConfig(name="killed", dtype="fp32")
    path = export.loras_folder() / "killed" / "killed.safetensors"
    export.save_lora(trainer, save, STARTED_AT)
    earlier = path.read_bytes()

    killed = start_holding_writer(path)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    (stale,) = path.parent.glob(".killed.safetensors.*.tmp")
    live = start_holding_writer(path)
    (live_temp,) = set(path.parent.glob(".killed.safetensors.*.tmp")) - {stale}
    assert path.read_bytes() == earlier

    export.save_lora(trainer, save, STARTED_AT)
    assert sorted(path.parent.glob(".*.tmp")) == [live_temp]
    assert export.load_lora_file(path).layers
    # The live writer finishes its save undisturbed.
    out, err = live.communicate("go on\n", timeout=120)
    assert live.returncode == 0 and out.strip() == "done", err[-3000:]
    assert not list(path.parent.glob(".*.tmp"))
    assert safetensors.torch.load_file(path)["lora_unet_x.alpha"].item() == 4.0


# -- the out-of-memory step ------------------------------------------------------------------------------


def test_out_of_memory_in_a_step_saves_the_last_whole_step_and_names_the_settings(tmp_path, monkeypatch):
    """CUDA's out-of-memory error raised inside the model's forward at step 4: the GPU stands in as a
    forward hook on a block that raises torch.OutOfMemoryError. The hook also leaves a saved-tensor-hooks
    context open in a suspended generator, as torch < 2.12's checkpoint did when its block raised; freed
    on another thread, that context fails with PyTorch's "SavedTensorHooks ... INTERNAL ASSERT FAILED"."""
    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", lambda report: unraisable.append(report.exc_value))
    lora = LoraConfig(rank=4, alpha=4.0)
    config = train_config(steps=5, gradient_checkpointing=True)
    patcher = MODEL_FACTORIES["sd3"]()
    straight = trainer_for(patcher, lora, config)
    straight.run()

    save = SaveConfig(name="oom", output_dir=str(tmp_path))
    first_half = trainer_for(patcher, lora, config)

    def left_open():
        with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
            yield

    def out_of_memory_in_step_four(module, args):
        if first_half.state.step == 3:
            context = left_open()
            next(context)
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (stand-in)")

    hooks_in_training_thread = []

    class Probe(JobHook):
        def on_end(self, trainer, cancelled):
            hooks_in_training_thread.append(torch._C._autograd._top_saved_tensors_default_hooks(False))
            return []

    handle = patcher.model.diffusion_model.joint_blocks[1].register_forward_pre_hook(out_of_memory_in_step_four)
    try:
        job = TrainingJob(first_half, [export.CheckpointHook(save), Probe()])
        with job:
            events = list(job.events())
        with pytest.raises(TrainingFailed) as failed:
            job.result()
    finally:
        handle.remove()
    checkpoint = export.checkpoints_folder(save) / "step-000003"
    message = events[-1].data["message"]
    assert events[-1].kind == "error" and message in str(failed.value)
    assert message.startswith("out of memory in step 4 (CUDA out of memory. Tried to allocate 2.00 GiB")
    assert f"the last whole step, 3, is saved in {checkpoint}" in message
    for setting in ("fp8", "gradient_checkpointing", "blocks_to_swap", "batch_size", "resolution", "sample_size"):
        assert setting in message
    assert "Traceback" not in str(failed.value)
    del failed, job
    gc.collect()
    assert hooks_in_training_thread == [None]
    assert not [e for e in unraisable if "SavedTensorHooks" in str(e) or "saved_tensors" in str(e)], unraisable

    second_half = trainer_for(patcher, lora, config)
    export.resume(second_half, export.checkpoints_folder(save))
    assert second_half.state.step == 3
    second_half.run()
    expected, actual = weights_of(straight), weights_of(second_half)
    assert all(torch.equal(actual[k], expected[k]) for k in expected)


@pytest.mark.parametrize("allocator_is_async", [False, True])
def test_a_step_out_of_memory_under_cuda_malloc_async_runs_again_after_the_pool_is_trimmed(monkeypatch,
                                                                                          allocator_is_async):
    """cudaMallocAsync's pool (a ComfyUI server's allocator; said so here, there is no GPU) keeps what earlier
    steps freed and does not give it back when the card is full, as PyTorch's own allocator does before it
    raises. There a step that runs out of memory runs once more after the pool is trimmed, and the run is the
    one that would have been, loss for loss and weight for weight; a second error in a row ends the run, as
    any such error does under PyTorch's own allocator."""
    monkeypatch.setattr(trainer_core.trainer, "under_cuda_malloc_async", lambda device: allocator_is_async)
    trims = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: trims.append(trainer.state.step))
    lora, config = LoraConfig(rank=4, alpha=4.0), train_config(steps=5, gradient_checkpointing=True, log_every=1)
    patcher = MODEL_FACTORIES["sd3"]()
    straight_losses = []
    straight = trainer_for(patcher, lora, config)
    straight.run(lambda _, reports: straight_losses.extend(report.loss for report in reports))
    errors_left = 0

    def out_of_memory_in_step_three(module, args):
        nonlocal errors_left
        if trainer.state.step == 2 and errors_left:
            errors_left -= 1
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (stand-in)")

    handle = patcher.model.diffusion_model.joint_blocks[1].register_forward_pre_hook(out_of_memory_in_step_three)
    try:
        errors_left, losses = 1, []
        trainer = trainer_for(patcher, lora, config)
        if not allocator_is_async:
            with pytest.raises(torch.OutOfMemoryError):
                trainer.run()
            assert trainer.state.step == 2 and trims == []
            return
        trainer.run(lambda _, reports: losses.extend(report.loss for report in reports))
        assert trims == [2] and losses == straight_losses
        expected, actual = weights_of(straight), weights_of(trainer)
        assert all(torch.equal(actual[k], expected[k]) for k in expected)

        errors_left, trims[:] = 2, []
        trainer = trainer_for(patcher, lora, config)
        with pytest.raises(torch.OutOfMemoryError):
            trainer.run()
        assert trainer.state.step == 2 and trims == [2]
    finally:
        handle.remove()


# -- row 14: a relative resume_from on the Train LoRA node -----------------------------------------------


@pytest.fixture(scope="module")
def dataset(comfy_server: ComfyServer) -> str:
    write_dataset(comfy_server.input_dir / "faults_dataset")
    return "faults_dataset"


def test_a_relative_resume_from_is_taken_from_comfyuis_output_folder(comfy_server: ComfyServer, dataset: str):
    first = unique("relative-first")
    graph = training_graph(tiny_loader("sd3"), dataset, first, steps=2, save_every=1, keep_last=0,
                           sample_prompts="")
    with comfy_server.events() as events:
        run(events, graph)
    checkpoint = comfy_server.output_dir / first / "checkpoints" / "step-000001"
    assert (checkpoint / "resume.json").is_file()

    second = unique("relative-second")
    relative = f"{first}/checkpoints/step-000001"
    resumed = training_graph(tiny_loader("sd3"), dataset, second, steps=2, save_every=0, sample_prompts="",
                             resume_from=relative)
    with comfy_server.events() as events:
        run(events, resumed)
    assert [s["step"] for s in trainer_events(events, "step")] == [2]
    assert trainer_events(events, "saved")[-1]["name"] == f"{second}/{second}.safetensors"
    assert_loads(checkpoint, 1)


class PreviewOutOfMemory(JobHook):
    """A preview between steps 2 and 3 that runs out of memory: a stand-in raising CUDA's error, as sampling at a
    large size would on the GPU."""

    every = 2

    def on_step(self, trainer):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.00 GiB (stand-in)")


def job_with_a_preview_out_of_memory(save: SaveConfig) -> TrainingJob:
    trainer = trainer_for(MODEL_FACTORIES["sd3"](), LoraConfig(rank=2), train_config(steps=5))
    return TrainingJob(trainer, [export.CheckpointHook(save), PreviewOutOfMemory()])


@pytest.mark.parametrize("allocator_is_async", [False, True])
def test_out_of_memory_in_a_preview_says_so_and_saves_the_step_before_it(tmp_path, monkeypatch, allocator_is_async):
    """The message places the error after step 2, not in step 3, and step 2 is saved. Where the run allocates
    through cudaMallocAsync (a ComfyUI server's default; said so here, there is no GPU) it also names ComfyUI's
    --disable-cuda-malloc, and only there."""
    monkeypatch.setattr(trainer_core.job, "under_cuda_malloc_async", lambda device: allocator_is_async)
    save = SaveConfig(name="oom-preview", output_dir=str(tmp_path))
    job = job_with_a_preview_out_of_memory(save)
    with job:
        events = list(job.events())
    message = events[-1].data["message"]
    assert events[-1].kind == "error"
    assert message.startswith("out of memory while previewing or saving after step 2 (CUDA out of memory.")
    assert f"the last whole step, 2, is saved in {export.checkpoints_folder(save) / 'step-000002'}" in message
    assert ("or start ComfyUI with --disable-cuda-malloc" in message) == allocator_is_async
    assert message.endswith(", then resume from that checkpoint")
    assert_loads(export.checkpoints_folder(save) / "step-000002", 2)


def test_lora_train_says_how_to_continue_after_running_out_of_memory(tmp_path, caplog):
    """The command line's view of the same error: the message once, then the command that resumes."""
    job = job_with_a_preview_out_of_memory(SaveConfig(name="oom-cli", output_dir=str(tmp_path)))
    with caplog.at_level(logging.INFO):
        code = headless.watch(job, "lora-train train oom.yaml --resume", show=False)
    assert code == headless.EXIT_FAILED
    assert caplog.text.count("out of memory while previewing or saving after step 2") == 1
    assert "Continue with: lora-train train oom.yaml --resume" in caplog.text
