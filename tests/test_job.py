"""The background training job: events, cancel, hooks between steps, errors."""

import threading

import comfy.model_management
import pytest
import torch
from test_engine import fixed_samples, train_config
from tiny_models import MODEL_FACTORIES

from trainer_core.config import LoraConfig
from trainer_core.job import Event, JobHook, TrainingFailed, TrainingJob, peak_vram_bytes
from trainer_core.trainer import Trainer


def make_trainer(steps=6, **overrides) -> Trainer:
    patcher = MODEL_FACTORIES["flux_dev"]()
    return Trainer(patcher, fixed_samples(patcher), LoraConfig(rank=4), train_config(steps=steps, **overrides))


class RecordingHook(JobHook):
    """Stands in for sampling: records what the model looked like between steps."""

    def __init__(self, every):
        self.every = every
        self.calls = []
        self.ended = None

    def on_step(self, trainer):
        up = next(layer.up for _, layer in trainer.network.items())
        self.calls.append({
            "step": trainer.state.step,
            "thread": threading.current_thread().name,
            "grad_enabled": torch.is_grad_enabled(),
            "lora_training_mode": trainer.network.training,
            "up_norm": float(up.norm()),
        })
        return [Event("sample", {"step": trainer.state.step})]

    def on_end(self, trainer, cancelled):
        self.ended = {"cancelled": cancelled, "step": trainer.state.step}
        return [Event("saved", {"step": trainer.state.step})]


def test_events_report_every_step_and_hooks_run_between_steps():
    hook = RecordingHook(every=2)
    job = TrainingJob(make_trainer(steps=6), [hook]).start()
    events = list(job.events())
    network = job.result()
    assert not job.running
    steps = [e.data for e in events if e.kind == "step"]
    assert [s["step"] for s in steps] == [1, 2, 3, 4, 5, 6]
    assert all(s["total_steps"] == 6 and s["loss"] > 0 and s["lr"] == pytest.approx(3e-3) for s in steps)
    assert steps[-1]["images_per_second"] > 0 and steps[-1]["eta_seconds"] == pytest.approx(0.0)
    assert steps[2]["eta_seconds"] > 0
    # Sampling at steps 2 and 4 (not at the end: on_end handles that), on the training thread,
    # without gradients and with dropout off, and then training goes on.
    assert [c["step"] for c in hook.calls] == [2, 4]
    assert all(c["thread"] == "lora-training" and not c["grad_enabled"] and not c["lora_training_mode"]
               for c in hook.calls)
    assert hook.calls[0]["up_norm"] > 0
    assert [e.kind for e in events if e.kind != "step"] == ["started", "sample", "sample", "saved", "done"]
    assert events[0].data == {"step": 0, "total_steps": 6, "compiling": False}
    assert all(s["notice"] == "" for s in steps), "a run on the CPU has nothing to say of CUDA graphs"
    assert events[-1].data == {"cancelled": False, "step": 6}
    assert hook.ended == {"cancelled": False, "step": 6}
    assert network is job.trainer.network
    assert job.trainer.optimizer is None, "training memory is given back when the job ends"


def test_cancel_stops_at_the_next_step_boundary_and_runs_the_end_hooks():
    hook = RecordingHook(every=0)
    job = TrainingJob(make_trainer(steps=1000), [hook]).start()
    for event in job.events():
        if event.kind == "step" and event.data["step"] == 3:
            job.cancel()
        last = event
    job.result()
    assert last.kind == "done" and last.data["cancelled"] is True
    assert 3 <= last.data["step"] < 1000
    assert hook.ended == {"cancelled": True, "step": last.data["step"]}


def test_a_request_runs_once_at_the_next_step():
    hook = RecordingHook(every=0)
    job = TrainingJob(make_trainer(steps=1000)).start()
    for event in job.events():
        if event.kind == "step" and event.data["step"] == 2:
            job.request(hook)
        if event.kind == "sample":
            job.cancel()
    job.result()
    assert len(hook.calls) == 1 and hook.calls[0]["step"] >= 2


def test_an_error_in_the_thread_reaches_the_caller_with_its_traceback():
    class Broken(JobHook):
        every = 2

        def on_step(self, trainer):
            raise ValueError("sampler exploded")

    job = TrainingJob(make_trainer(steps=5), [Broken()]).start()
    events = list(job.events())
    assert events[-1].kind == "error" and "sampler exploded" in events[-1].data["message"]
    with pytest.raises(TrainingFailed, match="sampler exploded") as failure:
        job.result()
    assert "in on_step" in str(failure.value), "the thread's traceback is part of the message"
    assert isinstance(failure.value.__cause__, ValueError)
    assert not job.running
    # The model is left clean after a failure too.
    for module in job.trainer.patcher.model.diffusion_model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks


def test_the_thread_never_outlives_the_job():
    with TrainingJob(make_trainer(steps=100000)) as job:
        next(e for e in job.events() if e.kind == "step")
        assert job.running
    assert not job.running


def test_the_host_is_told_the_model_trains_only_while_steps_run(monkeypatch):
    """ComfyUI 0.33 runs Flux's RoPE through a fused kernel without a backward unless
    `comfy.model_management.in_training` is set; 0.3.75 has no such flag (then it is added here, so
    the test checks the same behaviour on both hosts)."""
    monkeypatch.setattr(comfy.model_management, "in_training", False, raising=False)
    seen_in_steps = []

    class FlagHook(JobHook):
        every = 2

        def on_step(self, trainer):
            seen_in_steps.append(("between steps", comfy.model_management.in_training))
            return []

    trainer = make_trainer(steps=4)
    block = trainer.family.checkpoint_blocks()[0]
    handle = block.register_forward_pre_hook(
        lambda *_: seen_in_steps.append(("in a step", comfy.model_management.in_training)))
    try:
        job = TrainingJob(trainer, [FlagHook()]).start()
        list(job.events())
        job.result()
    finally:
        handle.remove()
    assert {flag for where, flag in seen_in_steps if where == "in a step"} == {True}
    assert [flag for where, flag in seen_in_steps if where == "between steps"] == [False]
    assert comfy.model_management.in_training is False


def test_step_events_carry_the_peak_vram_on_cuda_only(monkeypatch):
    events = list(TrainingJob(make_trainer(steps=2)).start().events())
    steps = [e.data for e in events if e.kind == "step"]
    assert len(steps) == 2 and all(s["peak_vram_bytes"] is None for s in steps), "no number is made up on the CPU"

    # On CUDA the field is PyTorch's peak count of the training device; reading that count needs a GPU.
    asked = []
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: asked.append(device) or 6_979_321_856)
    assert peak_vram_bytes(torch.device("cuda", 1)) == 6_979_321_856
    assert asked == [torch.device("cuda", 1)]


def test_requests_made_before_a_step_boundary_run_their_hook_once():
    """Forty "save now" requests before the next boundary are one: the first is taken, the others are told
    they were already made, and the hook runs once, at that boundary (the routes answer from this)."""
    hook = RecordingHook(every=0)
    job = TrainingJob(make_trainer(steps=3), [hook])
    answers = [job.request(hook) for _ in range(40)]
    assert answers.count(True) == 1 and answers[0] is True
    job.start()
    list(job.events())
    job.result()
    assert [call["step"] for call in hook.calls] == [1]
