"""Steps replayed as CUDA graphs (trainer_core/graphs.py), on the CPU.

This machine has no GPU, so these tests stand in for CUDA's graph recording, as close to its
semantics as the CPU allows: recording logs every operator the step dispatches (forward, the
checkpoints' recomputes, backward) with the tensors it read and wrote; a replay runs the same
operators again on the same tensors and writes each result into the tensor the recording made,
and runs none of the step's Python. What a real graph would get wrong, this gets wrong too: a
value read on the host while recording stays baked in, an input not copied into its buffer
trains on the first batch forever, gradients not handed back leave the optimizer stale. The
real graphs run on the GPU in bench/bench.py (bench/NOTES.md §5).
"""

import contextlib
import gc
import sys
import weakref

import comfy.model_management
import pytest
import torch
import torch.nn.functional as F
from test_blockswap import blocks_of, deep_flux, planned_memory
from test_engine import fixed_samples, train_config
from tiny_encoders import build_vae
from tiny_models import MODEL_FACTORIES, random_inputs
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

import trainer_core.job
import trainer_core.trainer
from trainer_core import blockswap, graphs, sampling
from trainer_core.blockswap import tensor_bytes
from trainer_core.config import ConfigError, LoraConfig
from trainer_core.families.flux import Flux
from trainer_core.families.sd3 import SD3
from trainer_core.graphs import GraphedSteps
from trainer_core.job import TrainingJob
from trainer_core.trainer import ALLOCATOR_NOTICE, Sample, Trainer

# The property itself: the fixture below stands in for it, and the allocator's tests put it back.
USES_CUDA_GRAPHS = Trainer.uses_cuda_graphs
HOST_READS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default}


class RecordedGraph:
    """Stands in for torch.cuda.CUDAGraph: a list of operators with the tensors they used."""

    def __init__(self):
        self.operators = []

    def replay(self) -> None:
        with torch.no_grad():
            for func, args, kwargs, outputs in self.operators:
                results, _ = tree_flatten(func(*args, **kwargs))
                for recorded, result in zip(outputs, results, strict=True):
                    if recorded is not None:
                        recorded.copy_(result)

    def pool(self):
        return object()

    def reset(self) -> None:
        self.operators.clear()


def _detached(value):
    return value.detach() if isinstance(value, torch.Tensor) else value


class Recording(TorchDispatchMode):
    """Stands in for torch.cuda.graph(...): logs the operators dispatched inside it."""

    def __init__(self, graph: RecordedGraph, pool=None, capture_error_mode="global"):
        super().__init__()
        self.graph = graph

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in HOST_READS:
            raise RuntimeError(f"{func} reads a value on the host while a CUDA graph records")
        out = func(*args, **kwargs)
        results, _ = tree_flatten(out)
        aliases = {r.alias_info is not None for r in func._schema.returns}
        # Outputs that alias an input (views, in-place results) follow it; others get the replay's values.
        outputs = [r.detach() if isinstance(r, torch.Tensor) and aliases != {True} else None for r in results]
        # Autograd's bookkeeping is not part of a graph: the replay works on detached aliases (same memory).
        args, kwargs = tree_map(_detached, (args, kwargs))
        self.graph.operators.append((func, args, kwargs, outputs))
        return out


@pytest.fixture
def recorded_graphs(monkeypatch) -> list[GraphedSteps]:
    """The stand-ins in place, graphs on wherever cuda_graphs is "auto"; lists each run's GraphedSteps."""
    monkeypatch.setattr(torch.cuda, "CUDAGraph", RecordedGraph)
    monkeypatch.setattr(torch.cuda, "graph", Recording)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: "the training thread's stream")
    monkeypatch.setattr(torch.cuda, "set_stream", lambda stream: None)
    monkeypatch.setattr(Trainer, "uses_cuda_graphs", property(lambda self: self.config.cuda_graphs == "auto"))
    made = []

    class Listed(GraphedSteps):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

        def release(self):
            # The graphs the run had at its end, before the trainer gives them back.
            self.count_at_release = self.graph_count
            super().release()

    monkeypatch.setattr(trainer_core.trainer, "GraphedSteps", Listed)
    return made


def trained(patcher, samples, mode: str, steps: int, between_steps=None, **overrides):
    # Losses are read every third step: each replay's loss must outlive the replays after it.
    config = train_config(steps=steps, cuda_graphs=mode, gradient_checkpointing=True, log_every=3, **overrides)
    trainer = Trainer(patcher, samples, LoraConfig(rank=4), config)
    losses = []

    def on_step(trainer, reports):
        losses.extend(r.loss for r in reports)
        if between_steps is not None:
            between_steps(trainer)

    trainer.run(on_step)
    return losses, {k: v.detach().clone() for k, v in trainer.network.state_dict().items()}


@pytest.mark.parametrize("name", ["sdxl_eps", "sd3", "flux_dev"])
def test_replayed_steps_train_exactly_like_eager_ones(recorded_graphs, name):
    """Step 1 runs eagerly (the warm-up), step 2 records and replays, steps 3-6 only replay: every
    loss and the trained LoRA equal the eager run's, so each replay saw its own batch, noise and
    timesteps, and the optimizer its own gradients."""
    patcher = MODEL_FACTORIES[name]()
    samples = fixed_samples(patcher, 3)
    eager_losses, eager_weights = trained(patcher, samples, "off", steps=6)
    assert not recorded_graphs
    losses, weights = trained(patcher, samples, "auto", steps=6)
    assert [g.count_at_release for g in recorded_graphs] == [1]
    assert len(set(eager_losses)) == 6, "every step trains on another batch"
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(eager_losses), rtol=0, atol=0)
    for key, value in eager_weights.items():
        torch.testing.assert_close(weights[key], value, rtol=0, atol=0)


def test_each_input_shape_gets_its_own_graph(recorded_graphs):
    """Two aspect-ratio buckets: each shape runs eagerly once, then records its own graph; a third
    shape past `max_shapes` would stay eager. Losses still equal the eager run's."""
    patcher = MODEL_FACTORIES["sd3"]()
    square = fixed_samples(patcher, 2)
    wide = [Sample(F.interpolate(s.latents[None], size=(8, 16))[0], s.conditioning, key=f"wide{i}")
            for i, s in enumerate(square)]
    samples = square + wide
    eager_losses, _ = trained(patcher, samples, "off", steps=8)
    losses, _ = trained(patcher, samples, "auto", steps=8)
    assert [g.count_at_release for g in recorded_graphs] == [2]
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(eager_losses), rtol=0, atol=0)


@contextlib.contextmanager
def a_weight_moved_after_step_3(patcher):
    """The between-steps hook that moves one weight of the model to new memory, with new values, after step 3
    (as ComfyUI making room for the VAE to decode a preview would); the weight goes back at the end, since
    the tiny factories' patchers share their model."""
    weight = next(patcher.model.diffusion_model.parameters())
    original = weight.data

    def move_a_weight(trainer):
        if trainer.state.step == 3:
            weight.data = weight.data * 0.5

    try:
        yield move_a_weight
    finally:
        weight.data = original


def test_a_model_moved_between_steps_is_recorded_again(recorded_graphs):
    """Sampling between steps may move the model off the GPU and back (ComfyUI makes room for the VAE):
    its weights then live elsewhere, and a graph recorded before would read the old memory. Here one
    weight moves, with new values, after step 3: the replayed run must still train like the eager one."""
    patcher = MODEL_FACTORIES["flux_dev"]()
    samples = fixed_samples(patcher, 2)
    with a_weight_moved_after_step_3(patcher) as move_a_weight:
        eager_losses, _ = trained(patcher, samples, "off", steps=6, between_steps=move_a_weight)
    with a_weight_moved_after_step_3(patcher) as move_a_weight:
        losses, _ = trained(patcher, samples, "auto", steps=6, between_steps=move_a_weight)
    assert [g.count_at_release for g in recorded_graphs] == [1]
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(eager_losses), rtol=0, atol=0)


def test_dropped_graphs_give_their_memory_back(recorded_graphs, monkeypatch):
    """When the weights move (a preview) and when the run ends, each graph is reset and its loss and gradients
    are emptied, whoever else still holds them."""
    captured = []
    capture = GraphedSteps._capture
    monkeypatch.setattr(GraphedSteps, "_capture", lambda self, *a: captured.append(capture(self, *a)) or captured[-1])
    patcher = MODEL_FACTORIES["flux_dev"]()
    with a_weight_moved_after_step_3(patcher) as move_a_weight:
        trained(patcher, fixed_samples(patcher, 2), "auto", steps=6, between_steps=move_a_weight)
    assert len(captured) == 2, "recorded at step 2, and again after the weight moved"
    assert all(not c.graph.operators for c in captured)
    for c in captured:
        assert c.loss.untyped_storage().nbytes() == 0
        assert all(g.untyped_storage().nbytes() == 0 for g in c.grads if g is not None)
    assert recorded_graphs[0].graph_count == 0


def under_cuda_malloc_async(monkeypatch, allocator: dict) -> None:
    """Says the run's device allocates through cudaMallocAsync where `allocator["async"]` (a ComfyUI server's
    default; there is no GPU here), and that it is a CUDA device steps may be recorded on."""
    for module in (trainer_core.trainer, trainer_core.job, graphs):
        monkeypatch.setattr(module, "under_cuda_malloc_async", lambda device: allocator["async"])
    monkeypatch.setattr(Trainer, "may_record", property(lambda self: self.config.cuda_graphs == "auto"))
    monkeypatch.setattr(Trainer, "uses_cuda_graphs", USES_CUDA_GRAPHS)


def test_under_cuda_malloc_async_steps_are_recorded_only_with_every_block_on_the_card_and_room_for_the_pool(
        recorded_graphs, monkeypatch):
    """Under cudaMallocAsync a recording that fails ends the process when its memory is freed (a ComfyUI
    server, seen on the GPU), and swapped steps failed to record there. So a step is recorded only where block
    swap's plan finds every block on the card with room for the recorded step's memory on top of the pool's
    (four sets of activations), none of its blocks compiled, and of a family measured to record there (SDXL);
    elsewhere the run steps eagerly and its step events carry the notice that names --disable-cuda-malloc. Under
    PyTorch's own allocator the same card records, swapped or not."""
    allocator = {"async": True}
    under_cuda_malloc_async(monkeypatch, allocator)
    # Flux's blocks plan here (several of them, as SDXL's on the GPU): said to be measured as SDXL is, but last.
    monkeypatch.setattr(Flux, "records_under_cuda_malloc_async", True)
    estimates, available, patchers = planned_memory(monkeypatch)

    def run(allocator_is_async: bool, blocks_to_swap: int = -1) -> tuple[int, int | None, set[str]]:
        """Blocks swapped, graphs the run held at its end (None: it made none) and its step events' notices."""
        allocator["async"] = allocator_is_async
        patchers.append(deep_flux())
        config = train_config(steps=4, gradient_checkpointing=True, blocks_to_swap=blocks_to_swap, log_every=1)
        trainer = Trainer(patchers[-1], fixed_samples(patchers[-1], 2), LoraConfig(rank=4), config)
        made = len(recorded_graphs)
        estimates.clear()
        with TrainingJob(trainer) as job:
            events = list(job.events())
        job.result()
        graph_count = recorded_graphs[-1].count_at_release if len(recorded_graphs) > made else None
        return trainer.blocks_swapped, graph_count, {e.data["notice"] for e in events if e.kind == "step"}

    assert run(True) == (0, 1, {""})
    graphed, eager = estimates
    activations = eager.activations // (1 + blockswap.ASYNC_POOL_ACTIVATIONS)
    assert graphed.activations == 4 * activations, "the recorded step's own set on top of the pool's three"
    blocks = [tensor_bytes(b) for b in blocks_of(deep_flux(), train_config(gradient_checkpointing=True))]

    def card_for(activation_sets: float) -> int:
        needed = eager.fixed - eager.activations + sum(blocks) + int(activation_sets * activations)
        return int((needed + blockswap.MARGIN_BYTES) / (1 - blockswap.MARGIN_SHARE))

    # Every block fits with three and a half sets: the pool's, not a recording's on top.
    available["bytes"] = card_for(3.5)
    assert run(True) == (0, None, {ALLOCATOR_NOTICE})
    assert run(False) == (0, 1, {""})
    # With one and a half sets a recorded step fits only with blocks swapped: recorded under PyTorch's allocator.
    available["bytes"] = card_for(1.5)
    swapped_native, graph_count, notices = run(False)
    assert swapped_native > 0 and graph_count == 1 and notices == {""}
    swapped_async, graph_count, notices = run(True)
    assert swapped_async >= swapped_native and graph_count is None and notices == {ALLOCATOR_NOTICE}
    # No plan looks at the memory where blocks_to_swap is set: nothing is recorded under cudaMallocAsync.
    available["bytes"] = 1 << 40
    assert run(True, blocks_to_swap=0) == (0, None, {ALLOCATOR_NOTICE})
    assert run(False, blocks_to_swap=0) == (0, 1, {""})
    # A family not measured to record under cudaMallocAsync steps eagerly there, with room to spare.
    monkeypatch.setattr(Flux, "records_under_cuda_malloc_async", False)
    assert run(True) == (0, None, {ALLOCATOR_NOTICE})
    assert run(False) == (0, 1, {""})
    monkeypatch.setattr(Flux, "records_under_cuda_malloc_async", True)
    # Compiled blocks (Triton kernels) failed to record under cudaMallocAsync on the GPU: the plan leaves them
    # eager there, with room to spare. (Their plan alone: compiling on the CPU is not what is tested.)
    monkeypatch.setattr(Trainer, "compiles_blocks", property(lambda self: True))
    for allocator["async"] in (True, False):
        patchers.append(deep_flux())
        config = train_config(steps=1, gradient_checkpointing=True)
        trainer = Trainer(patchers[-1], fixed_samples(patchers[-1], 2), LoraConfig(rank=4), config)
        assert trainer._auto_swap_count(blocks_of(patchers[-1], config)) == 0
        assert trainer.uses_cuda_graphs is not allocator["async"]
        assert trainer.allocator_notice == (ALLOCATOR_NOTICE if allocator["async"] else "")


def test_under_cuda_malloc_async_what_a_failed_recording_made_is_never_freed(recorded_graphs, monkeypatch, caplog):
    """A recording that fails halfway (out of memory in the backward, a gradient written) leaves memory that the
    recording allocated in use as it ends. Under PyTorch's own allocator it is freed before the eager retry, which
    needs it. Under cudaMallocAsync freeing the memory of a graph that never ran fails inside a destructor and
    ends the process (a ComfyUI server, on the GPU; frees while the recording runs are part of it and safe), so
    there none of it is freed, nor the gradients the recording wrote. Either way the run trains on as the
    eager one does."""
    allocator = {"async": False}
    under_cuda_malloc_async(monkeypatch, allocator)
    monkeypatch.setattr(SD3, "records_under_cuda_malloc_async", True)
    made, left_by_the_recording = [], []

    class FullCard(Recording):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            # Fails in the backward once it has written a gradient, as an allocation would: the op makes nothing.
            if any(p.grad is not None for p in recorded_graphs[-1].parameters):
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 214.00 MiB")
            out = super().__torch_dispatch__(func, types, args, kwargs)
            # New memory (not a view or in-place result), followed by its storage: views and aliases of one
            # storage come and go.
            if all(r.alias_info is None for r in func._schema.returns):
                made.extend(weakref.ref(t.untyped_storage()) for t in tree_flatten(out)[0]
                            if isinstance(t, torch.Tensor))
            return out

        def __exit__(self, *exc_info):
            left_by_the_recording.extend(ref for ref in made if ref() is not None)
            return super().__exit__(*exc_info)

    monkeypatch.setattr(torch.cuda, "graph", FullCard)
    patcher = MODEL_FACTORIES["sd3"]()
    samples = fixed_samples(patcher, 2)
    eager_losses, _ = trained(patcher, samples, "off", steps=4)
    kept_before = len(graphs._FAILED_RECORDINGS)
    alive = {}
    for allocator["async"] in (False, True):
        made.clear()
        left_by_the_recording.clear()
        losses, _ = trained(patcher, samples, "auto", steps=4)
        gc.collect()
        assert left_by_the_recording
        alive[allocator["async"]] = sum(ref() is not None for ref in left_by_the_recording) / len(left_by_the_recording)
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(eager_losses), rtol=0, atol=0)
    assert caplog.text.count("out of GPU memory while recording the training step") == 2
    assert alive == {False: 0, True: 1}
    kept = graphs._FAILED_RECORDINGS[kept_before:]
    assert len(kept) == 1 and isinstance(kept[0][0], torch.OutOfMemoryError)
    assert any(g is not None for g in kept[0][1]), "the gradients the recording wrote are kept too"
    del graphs._FAILED_RECORDINGS[kept_before:]


def test_a_swapped_run_replays_its_blocks_copies_and_trains_exactly_like_an_unswapped_eager_one(recorded_graphs):
    """Block swap (blockswap.py) inside the recorded step: the copies of the swapped blocks from host memory into
    the visit buffers are part of the recording, so each replay brings every block's weights into its buffer
    again. Between steps a preview-like model call (eager, no gradients) uses the buffers in another order,
    leaving other blocks' weights in them: a replay that did not copy would compute with those."""
    patcher = deep_flux()
    samples = fixed_samples(patcher, 3)
    inputs = random_inputs(patcher, batch=1, latent_hw=(16, 16), seed=5)

    def preview(trainer):
        with torch.no_grad():
            trainer.family.predict(inputs["x"], torch.tensor([0.5]),
                                   {"context": inputs["context"], "y": inputs["y"]})

    eager_losses, eager_weights = trained(patcher, samples, "off", steps=6)
    losses, weights = trained(patcher, samples, "auto", steps=6, between_steps=preview, blocks_to_swap=3)
    assert [g.count_at_release for g in recorded_graphs] == [1]
    assert len(set(eager_losses)) == 6
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(eager_losses), rtol=0, atol=0)
    for key, value in eager_weights.items():
        torch.testing.assert_close(weights[key], value, rtol=0, atol=0)


def previewed_every_third_step(recorded_graphs, monkeypatch, tmp_path, unclaimed_beside_graphs: int, preview=None):
    """A recorded SD3 run of 8 steps with a preview after steps 3 and 6, beside the eager run of the same
    steps. The preview's sampler is a stand-in (no GPU); the memory it asks for is ComfyUI's estimate for the
    real model and VAE, and the card's free memory is `unclaimed_beside_graphs` bytes (a GPU's answer).
    Returns both runs' losses, the graph count each preview found, and how often a step was recorded."""
    patcher = MODEL_FACTORIES["sd3"]()
    samples = fixed_samples(patcher, 2)
    at_preview, recorded = [], []

    def counted_preview(patcher, vae, encoded, settings):
        at_preview.append(recorded_graphs[-1].graph_count)
        return preview() if preview is not None else torch.zeros(1, 8, 8, 3)

    capture = GraphedSteps._capture
    monkeypatch.setattr(GraphedSteps, "_capture", lambda self, *a: recorded.append(a[0]) or capture(self, *a))
    monkeypatch.setattr(sampling, "sample_images", counted_preview)
    monkeypatch.setattr(sampling.comfy_compat, "unload_models", lambda models: None)
    monkeypatch.setattr(sampling.comfy_compat, "device_memory_unclaimed", lambda device: unclaimed_beside_graphs)
    hook = sampling.SampleHook(build_vae(16), None, sampling.SampleSettings(("x",)), 3, tmp_path / "samples")
    eager_losses, _ = trained(patcher, samples, "off", steps=8)
    losses, _ = trained(patcher, samples, "auto", steps=8, between_steps=lambda trainer: hook.on_step(trainer)
                        if trainer.state.step % 3 == 0 else None)
    return losses, eager_losses, at_preview, recorded


def sd3_preview_memory() -> int:
    patcher = MODEL_FACTORIES["sd3"]()
    return sampling.preview_memory(patcher, build_vae(16), sampling.SampleSettings(("x",)))


def test_a_preview_on_a_full_card_gets_the_recorded_steps_memory_and_they_record_again_after_it(
        recorded_graphs, monkeypatch, tmp_path):
    """A recorded step's pool holds its activations between steps; a preview's sampler and VAE need that
    memory on a small card (SD3.5 Medium on 8 GB ran out of memory previewing beside it). With less free than
    the preview needs, the preview hook releases the graphs first; the next steps record again and train as
    the eager run does."""
    losses, eager_losses, at_preview, recorded = previewed_every_third_step(
        recorded_graphs, monkeypatch, tmp_path, unclaimed_beside_graphs=sd3_preview_memory() - 1)
    # Recorded at step 2, released at the previews after steps 3 and 6, recorded again at steps 4 and 7.
    assert at_preview == [0, 0]
    assert len(recorded) == 3
    assert recorded_graphs[-1].count_at_release == 1
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(eager_losses), rtol=0, atol=0)


def test_a_preview_on_a_card_with_room_leaves_the_recorded_steps_alone(recorded_graphs, monkeypatch, tmp_path):
    """Where the card has the preview's memory free beside the graphs, they keep theirs: the steps after the
    preview replay at once instead of recording each bucket again (SDXL on 16 GB: 1.1-1.3 s per bucket and
    preview). The replays after a preview train exactly as the eager run."""
    losses, eager_losses, at_preview, recorded = previewed_every_third_step(
        recorded_graphs, monkeypatch, tmp_path, unclaimed_beside_graphs=sd3_preview_memory())
    assert at_preview == [1, 1]
    assert len(recorded) == 1, "recorded once, at step 2, and replayed through both previews"
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(eager_losses), rtol=0, atol=0)


def test_a_preview_out_of_memory_beside_the_recorded_steps_takes_their_memory_and_samples_again(
        recorded_graphs, monkeypatch, tmp_path, caplog):
    """ComfyUI's estimate can fall short of what a sampler takes. Out of memory beside the graphs (a stand-in
    for the GPU running out while graphs hold their pool), the preview releases them and samples again: the
    preview is saved and the run trains on as the eager run."""

    def preview_that_needs_the_graphs_memory():
        if recorded_graphs[-1].graph_count:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return torch.zeros(1, 8, 8, 3)

    with caplog.at_level("WARNING", logger="trainer_core.sampling"):
        losses, eager_losses, at_preview, recorded = previewed_every_third_step(
            recorded_graphs, monkeypatch, tmp_path, unclaimed_beside_graphs=sd3_preview_memory(),
            preview=preview_that_needs_the_graphs_memory)
    assert at_preview == [1, 0, 1, 0]
    assert len(recorded) == 3
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == ["step000003_00.png", "step000006_00.png"]
    assert sum("out of GPU memory previewing beside the recorded training steps" in r.message
               for r in caplog.records) == 2
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(eager_losses), rtol=0, atol=0)


def test_a_previews_memory_is_comfyuis_ask_for_its_sampler_or_its_vae_and_grows_with_its_size():
    """The estimate the preview hook holds against the free memory: at least what ComfyUI keeps for inference
    beside the VAE's weights, and larger for a larger preview (the sampler's and the decoder's memory grow with
    the image's area)."""
    patcher = MODEL_FACTORIES["sd3"]()
    vae = build_vae(16)
    small, large = (sampling.preview_memory(patcher, vae, sampling.SampleSettings(("x",), width=side, height=side))
                    for side in (512, 1024))
    floor = comfy.model_management.minimum_inference_memory() + vae.patcher.model_size()
    assert floor < small < large
    decode_1024 = vae.memory_used_decode([1, 16, 128, 128], vae.vae_dtype)
    assert large >= decode_1024 + floor


def test_the_memory_a_preview_can_have_beside_the_graphs_leaves_out_what_pytorch_holds(monkeypatch):
    """ComfyUI counts memory PyTorch's cache holds unused as free; a graph's pool sits in that cache and
    serves no one else, so the preview hook reckons with the driver's free memory alone. The driver's and the
    allocator's answers are stand-ins here (no GPU): 3 GiB free on the card, 9 reserved, 5 of them in use."""
    gib = 2**30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (3 * gib, 16 * gib))
    monkeypatch.setattr(torch.cuda, "memory_stats", lambda device=None: {"active_bytes.all.current": 5 * gib,
                                                                        "reserved_bytes.all.current": 9 * gib})
    device = torch.device("cuda", 0)
    assert comfy.model_management.get_free_memory(device) == 7 * gib
    assert sampling.comfy_compat.device_memory_unclaimed(device) == 3 * gib


def test_graphs_stay_off_where_a_step_cannot_be_one_graph():
    """fp16's gradient scaler reads on the host between backward and step, accumulation runs several
    backwards per step, and LoRA dropout's masks in a recorded step are not verified: those runs, and
    the CPU, step eagerly. A wrong mode names the field."""
    patcher = MODEL_FACTORIES["sd3"]()
    samples = fixed_samples(patcher, 2)
    for overrides in ({}, {"gradient_accumulation": 2}, {"precision": "fp16"}):
        assert not Trainer(patcher, samples, LoraConfig(rank=4), train_config(**overrides)).uses_cuda_graphs
    assert not Trainer(patcher, samples, LoraConfig(rank=4, dropout=0.1), train_config()).uses_cuda_graphs
    with pytest.raises(ConfigError, match=r"^train\.cuda_graphs: 'on' is not one of 'auto', 'off'"):
        train_config(cuda_graphs="on")


def test_a_step_that_cannot_be_recorded_runs_eagerly_with_a_warning(recorded_graphs, monkeypatch, caplog):
    """A model whose forward reads a value on the host (which CUDA forbids while recording) does not
    end the run: the recording is dropped, a warning says why, and every step runs eagerly."""
    loss = Trainer.loss

    def loss_read_on_the_host(self, *args):
        value = loss(self, *args)
        if value.item() < 0:  # never true: the read is the point
            raise AssertionError
        return value

    monkeypatch.setattr(Trainer, "loss", loss_read_on_the_host)
    patcher = MODEL_FACTORIES["flux_dev"]()
    samples = fixed_samples(patcher, 2)
    eager_losses, _ = trained(patcher, samples, "off", steps=4)
    losses, _ = trained(patcher, samples, "auto", steps=4)
    assert [g.count_at_release for g in recorded_graphs] == [0]
    assert "could not be recorded as a CUDA graph" in caplog.text and "reads a value on the host" in caplog.text
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(eager_losses), rtol=0, atol=0)


def test_a_recording_that_runs_out_of_memory_leaves_the_run_eager(recorded_graphs, monkeypatch, caplog):
    """On a full card the second bucket's recording can run out of memory beside the first graph's pool
    (seen with Flux on a simulated 16 GB card): the run drops its graphs and goes on eagerly, training as
    the eager run does, instead of ending with an out-of-memory error. CUDA's allocator is what fails on
    the GPU; here the stand-in recording raises its error once a graph exists."""

    class FullCard(Recording):
        def __enter__(self):
            if recorded_graphs and recorded_graphs[-1].graph_count:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 72.00 MiB")
            return super().__enter__()

    monkeypatch.setattr(torch.cuda, "graph", FullCard)
    # The eager retry must run after the failed recording's exception is handled: while it is, its traceback
    # keeps that attempt's activations alive, and on a full card the retry runs out of memory again.
    handled_during_steps = []
    forward_backward = Trainer._forward_backward

    def noting_handled_exceptions(self, *args):
        handled_during_steps.append(sys.exc_info()[1])
        return forward_backward(self, *args)

    monkeypatch.setattr(Trainer, "_forward_backward", noting_handled_exceptions)
    patcher = MODEL_FACTORIES["sd3"]()
    square = fixed_samples(patcher, 2)
    wide = [Sample(F.interpolate(s.latents[None], size=(8, 16))[0], s.conditioning, key=f"wide{i}")
            for i, s in enumerate(square)]
    eager_losses, eager_weights = trained(patcher, square + wide, "off", steps=8)
    losses, weights = trained(patcher, square + wide, "auto", steps=8)
    assert [g.count_at_release for g in recorded_graphs] == [0]
    assert "out of GPU memory while recording the training step" in caplog.text
    assert handled_during_steps and not any(handled_during_steps)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(eager_losses), rtol=0, atol=0)
    for key, value in eager_weights.items():
        torch.testing.assert_close(weights[key], value, rtol=0, atol=0)


def test_a_swapped_step_that_fails_inside_its_recording_joins_its_copies_frees_its_memory_and_goes_on_eagerly(
        recorded_graphs, monkeypatch, caplog):
    """Out of memory halfway through recording a swapped step (the second bucket's, beside the first graph's
    pool: SD3.5 Large on a 12 GB card, eighth session). On the GPU the next block's copy was pending on the
    side stream, and CUDA ended the recording with "capturing stream has unjoined work", hiding the real error;
    the attempt's activations then stayed allocated and the eager retry ran out of memory too. Here the stand-in
    recording raises in the middle of the backward: the step must join the pending copies before the error
    leaves it, the retry must find the failed attempt's tensors freed, and the run trains as the eager one."""
    failing = {"ops": 0, "made": [], "joined": []}

    class FullCard(Recording):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = super().__torch_dispatch__(func, types, args, kwargs)
            if recorded_graphs[-1].graph_count and torch._C._current_graph_task_id() != -1:
                failing["made"] += [weakref.ref(t) for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
                failing["ops"] += 1
                if failing["ops"] == 40:
                    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 214.00 MiB")
            return out

    monkeypatch.setattr(torch.cuda, "graph", FullCard)
    join = blockswap.BlockSwapper.join
    monkeypatch.setattr(blockswap.BlockSwapper, "join",
                        lambda self: failing["joined"].append(sorted(self._present)) or join(self))
    alive_at_retry = []
    forward_backward = Trainer._forward_backward

    def noting_survivors(self, *args):
        if failing["ops"] >= 40 and not alive_at_retry:
            # What the attempt computed; not the swapper's tensors placed on its buffers' memory (kept for the run).
            buffers = {b.memory.untyped_storage().data_ptr() for b in self._swapper._buffers}
            alive_at_retry.append(sum(ref() is not None and ref().untyped_storage().data_ptr() not in buffers
                                      for ref in failing["made"]))
        return forward_backward(self, *args)

    monkeypatch.setattr(Trainer, "_forward_backward", noting_survivors)
    patcher = deep_flux()
    square = fixed_samples(patcher, 2)
    wide = [Sample(F.interpolate(s.latents[None], size=(8, 16))[0], s.conditioning, key=f"wide{i}")
            for i, s in enumerate(square)]
    eager_losses, eager_weights = trained(patcher, square + wide, "off", steps=8)
    losses, weights = trained(patcher, square + wide, "auto", steps=8, blocks_to_swap=3)
    assert "out of GPU memory while recording the training step" in caplog.text
    # The failure came in the backward, with the copy of the next block (in backward order) made ahead.
    assert len(failing["joined"]) == 1 and failing["joined"][0]
    assert alive_at_retry == [0], "the failed recording's tensors are freed before the eager retry"
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(eager_losses), rtol=0, atol=0)
    for key, value in eager_weights.items():
        torch.testing.assert_close(weights[key], value, rtol=0, atol=0)
