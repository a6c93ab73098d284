"""Compiled blocks across aspect-ratio buckets and previews, and the ETA around compiling, on the CPU."""

import functools
import types

import comfy.model_management
import comfy.sample
import pytest
import torch
from test_engine import train_config
from tiny_models import MODEL_FACTORIES, build_flux, random_inputs

from trainer_core import checkpointing, job
from trainer_core.config import LoraConfig
from trainer_core.job import JobHook, TrainingJob
from trainer_core.trainer import BatchOrder, Sample, Trainer


def bucketed_samples(patcher, sizes, tokens=(8,)) -> list[Sample]:
    samples = []
    for i, latent_hw in enumerate(sizes):
        inputs = random_inputs(patcher, batch=1, latent_hw=latent_hw, seed=300 + i, tokens=tokens[i % len(tokens)])
        samples.append(Sample(inputs["x"][0], {"context": inputs["context"][0], "y": inputs["y"][0]}, key=str(i)))
    return samples


@pytest.mark.parametrize("shapes, batch_size, expected", [
    ([(4, 8, 8)] * 4, 2, {(2, 4, 8, 8)}),
    ([(4, 8, 8)] * 3, 2, {(2, 4, 8, 8), (1, 4, 8, 8)}),  # the last batch of a bucket is smaller
    ([(4, 8, 8)] * 3, 4, {(3, 4, 8, 8)}),
    ([(4, 8, 8), (4, 8, 12), (4, 8, 8)], 1, {(1, 4, 8, 8), (1, 4, 8, 12)}),
])
def test_batch_shapes_are_every_shape_an_epoch_has(shapes, batch_size, expected):
    order = BatchOrder(shapes, batch_size, seed=3)
    assert order.batch_shapes() == expected
    seen = {(len(batch), *shapes[batch[0]]) for epoch in range(4) for batch in order.epoch(epoch)}
    assert seen == expected


@pytest.mark.parametrize("sizes, tokens, batch_size, varies", [
    ([(16, 16)] * 4, (8,), 1, False),
    ([(16, 16)] * 4, (8,), 2, False),
    ([(16, 16)] * 3, (8,), 2, True),
    ([(16, 16), (16, 24)], (8,), 1, True),
    ([(16, 16)] * 2, (8, 12), 1, True),
])
def test_blocks_compile_for_any_size_only_where_the_run_has_several_input_shapes(sizes, tokens, batch_size, varies):
    patcher = MODEL_FACTORIES["sd3"]()
    trainer = Trainer(patcher, bucketed_samples(patcher, sizes, tokens), LoraConfig(rank=4),
                      train_config(batch_size=batch_size, compile_blocks="on"))
    assert trainer.input_shapes_vary is varies


class PreviewHook(JobHook):
    """A preview as a run makes one between steps: ComfyUI's sampler at another size than the training
    batches, batch 2 (cfg's conditional and unconditional halves), no gradients; then the model partly
    unloaded and loaded again, as for the VAE on a small card."""

    def __init__(self, every, latent_hw):
        self.every = every
        self.latent_hw = latent_hw
        self.latents = []

    def on_step(self, trainer):
        inputs = random_inputs(trainer.patcher, batch=1, latent_hw=self.latent_hw, seed=7)
        positive = [[inputs["context"], {"pooled_output": inputs["y"]}]]
        negative = [[torch.zeros_like(inputs["context"]), {"pooled_output": torch.zeros_like(inputs["y"])}]]
        empty = torch.zeros_like(inputs["x"])
        noise = comfy.sample.prepare_noise(empty, 7)
        self.latents.append(comfy.sample.sample(trainer.patcher, noise, 2, 2.0, "euler", "simple", positive, negative,
                                                empty, seed=7, disable_pbar=True))
        # On a small card ComfyUI unloads part of the model to decode with the VAE; the preview then
        # loads it back as SampleHook does.
        assert trainer.patcher.partially_unload(trainer.patcher.offload_device, memory_to_free=1 << 40) > 0
        trainer.reload_model()
        return []


def test_compiled_blocks_compile_once_per_class_across_buckets_and_previews(monkeypatch):
    """Three aspect-ratio buckets and a preview every two steps, on a Flux of three double and three
    single blocks: each block class compiles once for all its blocks, and nothing compiles after the
    first step. Compiled for fixed sizes, every block compiled again at each new bucket and for the preview
    (SD3.5 on an H200: ~95 s at the second bucket; issue 13). After the model was partly unloaded and loaded
    again, ComfyUI's modules hold as instance attributes what they read from their class before, and
    every block compiled again (SD3.5 Large, Flux on 12 and 16 GB cards: 80-100 s after each preview).
    With a code object per block, Flux compiled 57 times (175 s before its first step on an H200).

    Stand-ins, both for this CPU only: dynamo hands its graphs to AOTAutograd's eager backend instead of
    Inductor (whose C++ builds take minutes here; the variants and guards are dynamo's and AOTAutograd's),
    and ComfyUI's CPU attention reads a constant free memory (a changing reading compiles anew at every
    call on the CPU, see test_engine's busy-CPU test)."""
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    monkeypatch.setattr(comfy.model_management, "get_free_memory",
                        lambda dev=None, torch_free_too=False: (8 << 30, 8 << 30) if torch_free_too else 8 << 30)
    torch._dynamo.reset()  # the tiny model is shared: drop what other tests compiled for its blocks
    patcher = build_flux("dev", blocks=(3, 3))
    samples = bucketed_samples(patcher, [(16, 16), (16, 24), (24, 16), (24, 24), (16, 16), (24, 24)])
    trainer = Trainer(patcher, samples, LoraConfig(rank=4),
                      train_config(steps=7, gradient_checkpointing=True, compile_blocks="on"))
    preview = PreviewHook(every=2, latent_hw=(20, 20))
    shapes, frames = [], []
    trainer_step = trainer.step
    frames_before = torch._dynamo.utils.counters["frames"]["total"]  # the session's count, other tests' included

    def step():
        loss = trainer_step()
        shapes.append(tuple(trainer.samples[trainer._batches[trainer.state.data.batch - 1][0]].latents.shape))
        frames.append(torch._dynamo.utils.counters["frames"]["total"] - frames_before)
        return loss

    trainer.step = step
    with TrainingJob(trainer, [preview]) as training:
        events = list(training.events())
    training.result()
    assert events[-1].kind == "done"
    assert {s[1:] for s in shapes} == {(16, 16), (16, 24), (24, 16), (24, 24)}, "the run saw every bucket"
    assert len(preview.latents) == 3 and preview.latents[0].shape[-2:] == (20, 20)
    blocks = trainer.family.checkpoint_blocks()
    classes = {type(b) for b in blocks}
    assert len(blocks) == 6 and len(classes) == 2
    variants = {cls.__name__: len(torch._dynamo.eval_frame._debug_get_cache_entry_list(cls.forward.__code__))
                for cls in classes}
    assert all(1 <= n <= 2 for n in variants.values()), f"compiled variants per block class: {variants}"
    assert frames[0] == sum(variants.values()) < len(blocks), f"frames compiled by step: {frames}"
    assert frames == [frames[0]] * len(frames), f"frames compiled by step: {frames}"


def test_blocks_that_read_their_own_index_compile_each_with_code_of_its_own(monkeypatch):
    """SDXL's blocks read `transformer_index` and `block` from their options, so each is compiled with
    a code object of its own: one variant each, found at once, instead of all of them walked per call.
    Variants are dynamo's (its guards), so dynamo's eager backend stands in for Inductor here: AOTAutograd
    (the test above) adds no variant and took 30 of this test's 75 s on the CPU."""
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    torch._dynamo.reset()
    patcher = MODEL_FACTORIES["sdxl_eps"]()
    samples = bucketed_samples(patcher, [(16, 16)] * 2)
    trainer = Trainer(patcher, samples, LoraConfig(rank=4),
                      train_config(steps=1, gradient_checkpointing=True, compile_blocks="on"))
    with TrainingJob(trainer, []) as training:
        list(training.events())
    training.result()
    blocks = trainer.family.checkpoint_blocks()
    variants = [len(torch._dynamo.eval_frame._debug_get_cache_entry_list(checkpointing._OWN_FORWARDS[b].__code__))
                for b in blocks]
    assert variants == [1] * len(blocks), f"compiled variants per block: {variants}"


class StepClock:
    """time.perf_counter as the job reads it, moved on by the test's steps."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_the_eta_leaves_out_a_later_step_that_compiled(monkeypatch):
    clock = StepClock()
    monkeypatch.setattr(job, "time", types.SimpleNamespace(perf_counter=clock))
    patcher = MODEL_FACTORIES["flux_dev"]()
    trainer = Trainer(patcher, bucketed_samples(patcher, [(16, 16)] * 2), LoraConfig(rank=4), train_config(steps=8))
    compiled_functions = []
    trainer_step = trainer.step

    def step():
        loss = trainer_step()
        if trainer.state.step in (1, 4):
            # A real compile in the step, as a new input shape would make (dynamo's eager backend: fast).
            function = torch.compile(lambda x, n=trainer.state.step: x * n, backend="eager")
            compiled_functions.append(function(torch.ones(3)))
            clock.now += 100.0
        else:
            clock.now += 1.0
        return loss

    trainer.step = step
    with TrainingJob(trainer) as training:
        steps = [e.data for e in training.events() if e.kind == "step"]
    training.result()
    assert len(compiled_functions) == 2
    # Steps 2, 3, 5, ... take a second each; step 4 compiled for 100 s and step 1 carries the warm-up.
    assert steps[2]["eta_seconds"] == pytest.approx(5.0)  # after step 3: two steps of 1 s, five to go
    assert steps[4]["eta_seconds"] == pytest.approx(3.0)  # after step 5: step 4 left out of the pace
    assert steps[4]["images_per_second"] == pytest.approx(1.0)
    assert steps[-1]["eta_seconds"] == pytest.approx(0.0)
    assert steps[-1]["elapsed_seconds"] == pytest.approx(100 + 1 + 1 + 100 + 4)

