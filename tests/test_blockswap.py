"""Block swap (trainer_core/blockswap.py) on the CPU.

There is no second device here: the training device is the CPU, and a swapped block's stored copy is its
own CPU tensors. What stands in for "on the card" is a block's parameters being real tensors; away, they
are placeholders on the meta device, which is what a swapped block holds off the card on a GPU too. The
copy is a real copy into one of the visit buffers, as on a GPU; the side stream, its events and pinned
memory, which need CUDA, are stood in for where a test says so (bench/blockswap.py and bench/realrun.py
run them on the GPU).
"""

import copy
import gc
import logging
import weakref
from types import SimpleNamespace

import comfy.model_management
import comfy.sample
import pytest
import tiny_models
import torch
import yaml
from test_cli import line_of, short_form, write
from test_engine import fixed_samples, lora_weights, run_collecting_losses, train_config
from tiny_models import (
    FLUX_CONFIG_CLASSES,
    FLUX_TEXT,
    MODEL_FACTORIES,
    _build_direct,
    flux_config,
    load_sd3,
    random_inputs,
)

import trainer_core.trainer
from trainer_core import blockswap, cli, comfy_compat, sampling
from trainer_core.blockswap import (
    MemoryEstimate,
    activation_bytes,
    block_hidden_states,
    block_width,
    bytes_on_device,
    fewest_blocks_that_fit,
    swapped_indices,
    tensor_bytes,
)
from trainer_core.config import ConfigError, LoraConfig
from trainer_core.families import family_for
from trainer_core.job import JobHook, TrainingJob
from trainer_core.trainer import Trainer

_deep_flux = []


def new_deep_flux():
    """Narrow Flux dev with 3 double and 4 single blocks (7 blocks: swapped ones with unswapped between),
    a model of its own, initialised from the same seed each time."""
    config = flux_config(128, 2, [8, 28, 28], depth=3, single=4, context_dim=FLUX_TEXT.context_dim,
                         pooled=FLUX_TEXT.pooled_dim, guidance=True)
    return _build_direct(FLUX_CONFIG_CLASSES["dev"](config))


def deep_flux():
    """A clone of one shared `new_deep_flux` model."""
    if not _deep_flux:
        _deep_flux.append(new_deep_flux())
    return _deep_flux[0].clone()


MODELS = {"flux_dev": deep_flux, "sd3": MODEL_FACTORIES["sd3"], "sdxl_eps": MODEL_FACTORIES["sdxl_eps"]}


def blocks_of(patcher, config):
    return family_for(patcher.model, config).checkpoint_blocks()


def is_away(block: torch.nn.Module) -> bool:
    return all(t.is_meta for t in (*block.parameters(), *block.buffers()))


def is_here(block: torch.nn.Module) -> bool:
    return not any(t.is_meta for t in (*block.parameters(), *block.buffers()))


def snapshot(patcher) -> dict:
    """Every tensor of the model: the object (so a swapped run must put back the very same ones), its
    values and device."""
    return {name: (tensor, tensor.detach().clone(), tensor.device)
            for name, tensor in patcher.model.diffusion_model.state_dict(keep_vars=True).items()}


@pytest.mark.parametrize("name, swapped", [("flux_dev", 3), ("sd3", 1), ("sdxl_eps", 5)])
def test_a_swapped_run_trains_the_same_lora_as_an_unswapped_one_bit_for_bit(name, swapped):
    losses, weights = {}, {}
    for swap in (0, swapped):
        patcher = MODELS[name]()
        config = train_config(steps=4, gradient_checkpointing=True, blocks_to_swap=swap)
        trainer = Trainer(patcher, fixed_samples(patcher), LoraConfig(rank=4), config)
        losses[swap] = run_collecting_losses(trainer)
        weights[swap] = lora_weights(trainer.network)
        assert trainer.blocks_swapped == swap
    assert losses[swapped] == losses[0]
    assert weights[swapped].keys() == weights[0].keys()
    assert all(torch.equal(weights[swapped][k], weights[0][k]) for k in weights[0])


def test_swapped_blocks_are_on_the_device_only_while_they_compute_and_are_copied_ahead(monkeypatch):
    patcher = deep_flux()
    config = train_config(steps=2, gradient_checkpointing=True, blocks_to_swap=3)
    blocks = blocks_of(patcher, config)
    assert len(blocks) == 7 and swapped_indices(7, 3) == [1, 3, 5]
    swapped = [blocks[i] for i in swapped_indices(7, 3)]
    seen = {"computed": 0, "returned": 0}

    def computing(block):
        def check(module, args):
            # Any layer of a swapped block runs with the block's weights on the device, in the forward
            # and in the checkpoint's recompute during backward alike, and no other swapped block's.
            assert is_here(block)
            assert sum(is_here(b) for b in swapped) == 1
            seen["computed"] += 1
        return check

    def returned(module, args, output):
        assert is_away(module)
        seen["returned"] += 1

    # Spies on the swapper: whether each block's copy was made ahead of its arrival, and how many
    # swapped blocks were on the device (or on their way) at each copy.
    arrivals, copies_present = [], []
    arrive, copy_block = blockswap.BlockSwapper._arrive, blockswap.BlockSwapper._copy

    def arrive_spy(self, index):
        arrivals.append((index, index in self._present, torch._C._current_graph_task_id() != -1))
        return arrive(self, index)

    def copy_spy(self, index):
        copies_present.append(len(self._present) + 1)
        return copy_block(self, index)

    monkeypatch.setattr(blockswap.BlockSwapper, "_arrive", arrive_spy)
    monkeypatch.setattr(blockswap.BlockSwapper, "_copy", copy_spy)
    handles = []
    for block in swapped:
        handles += [layer.register_forward_pre_hook(computing(block)) for layer in block.modules()
                    if isinstance(layer, torch.nn.Linear)]
        handles.append(block.register_forward_hook(returned))
    in_between = []

    def between_steps(trainer, reports):
        in_between.append([is_away(b) for b in swapped])

    try:
        trainer = Trainer(patcher, fixed_samples(patcher), LoraConfig(rank=4), config)
        trainer.run(between_steps)
    finally:
        for handle in handles:
            handle.remove()
    # 2 steps x 3 blocks x (forward, recompute), through every linear layer; the forward hook sees the
    # forward only (a recompute calls the block's forward function, not the module).
    assert seen["computed"] >= 2 * 3 * 2 and seen["returned"] == 2 * 3
    # Forward in block order, recompute in reverse; every copy made while the block before computed.
    step = [(1, True, False), (3, True, False), (5, True, False), (5, True, True), (3, True, True), (1, True, True)]
    assert arrivals == step * 2
    # On the CPU nothing runs ahead of the host: the block computing and the next one.
    assert max(copies_present) == 2
    assert in_between == [[True] * 3] * 2
    # After the run the blocks hold their own weights again.
    assert all(is_here(b) for b in swapped)


def test_each_copy_waits_on_the_device_for_its_buffers_previous_block_to_be_done_and_never_on_the_host(monkeypatch):
    """What keeps a swapped run's memory fixed and its copies right on a GPU, where the host runs ahead of the
    device: each copy goes into one of three buffers, and the side stream first waits until the compute
    stream has begun the visit after that buffer's previous block (so its recompute and backward are done),
    or, where the buffer holds nothing of this model call, until the compute stream has done what the host
    queued so far. The waits are CUDA events, which a CUDA graph records; the host never waits. This CPU test
    stands in a marker for each event (no GPU here): ("arrival", n) the n-th visit's start, ("queued", n) the
    point after n visits at which a copy was made."""
    arrivals, copies = [], []
    marking = {"arrival": False}
    arrive, copy_block = blockswap.BlockSwapper._arrive, blockswap.BlockSwapper._copy

    def arrive_spy(self, index):
        marking["arrival"] = True
        try:
            return arrive(self, index)
        finally:
            marking["arrival"] = False

    def mark_compute(self):
        # Markers are tuples: a wait on the host (an event's synchronize) would fail the test.
        if marking["arrival"]:
            arrivals.append(len(arrivals) + 1)
            return "arrival", arrivals[-1]
        return "queued", len(arrivals)

    def copy_into(self, places, slots, ready):
        copies.append(ready)
        for place, slot in zip(places, slots, strict=True):
            place.copy_(slot.stored)

    def copy_spy(self, index):
        number, event = copy_block(self, index)
        copies[-1] = (index, number, copies[-1])
        return number, event

    monkeypatch.setattr(blockswap.BlockSwapper, "_arrive", arrive_spy)
    monkeypatch.setattr(blockswap.BlockSwapper, "_mark_compute", mark_compute)
    monkeypatch.setattr(blockswap.BlockSwapper, "_copy_into", copy_into)
    monkeypatch.setattr(blockswap.BlockSwapper, "_copy", copy_spy)
    patcher = deep_flux()
    trainer = Trainer(patcher, fixed_samples(patcher), LoraConfig(rank=4),
                      train_config(steps=2, gradient_checkpointing=True, blocks_to_swap=3))
    trainer.run(lambda trainer, reports: None)
    assert arrivals == list(range(1, 13))
    # Per step, blocks 1, 3, 5 in the forward (visits 1-3), 5, 3, 1 in the backward (visits 4-6), each copied
    # while the block before it computes, in buffers 0, 1, 2 in turn. The forward's copies find their buffers
    # free in this call; the backward's wait for the visit after their buffer's previous one: block 5's
    # recompute (buffer 0, last visited by block 1, visit 1) for visit 2.
    first = [(1, 0, ("queued", 0)), (3, 1, ("queued", 1)), (5, 2, ("queued", 2)),
             (5, 0, ("arrival", 2)), (3, 1, ("arrival", 3)), (1, 2, ("arrival", 4))]
    second = [(index, number, (kind, seen + 6)) for index, number, (kind, seen) in first]
    assert copies == first + second
    assert blockswap.RESIDENT_WINDOW == 3


@pytest.mark.parametrize("name", ["flux_dev", "sdxl_eps"])
def test_nothing_of_a_swapped_run_stays_behind(name):
    patcher = MODELS[name]()
    inputs = random_inputs(patcher, batch=1, latent_hw=(16, 16), seed=5)
    family = family_for(patcher.model, train_config())
    sigma = torch.tensor([500]) if name.startswith("sdxl") else torch.tensor([0.5])

    def generate():
        with torch.no_grad():
            return family.predict(inputs["x"], sigma, {"context": inputs["context"], "y": inputs["y"]})

    before_output = generate()
    config = train_config(steps=2, gradient_checkpointing=True, blocks_to_swap=4)
    trainer = Trainer(patcher, fixed_samples(patcher), LoraConfig(rank=4), config)
    trainer.run()
    before = snapshot(patcher)
    # A second run from the state the first left: the same objects, values and devices afterwards.
    Trainer(patcher, fixed_samples(patcher), LoraConfig(rank=4), config).run()
    after = snapshot(patcher)
    assert after.keys() == before.keys()
    for key, (tensor, values, device) in before.items():
        assert after[key][0] is tensor, key
        assert torch.equal(after[key][1], values) and after[key][2] == device, key
    modules = list(patcher.model.diffusion_model.modules())
    assert not any(isinstance(m, blockswap._StandIn) for m in modules)
    for module in modules:
        assert not module._forward_hooks and not module._forward_pre_hooks, type(module).__name__
        assert "forward" not in vars(module), type(module).__name__
    # ComfyUI holds the model as unloaded (the next generation loads it whole), and it generates as before.
    assert not any(m.model is not None and m.model.is_clone(patcher)
                   for m in comfy.model_management.current_loaded_models)
    assert torch.equal(generate(), before_output)


def test_a_swapped_run_trains_a_model_loaded_under_inference_mode_twice_and_keeps_its_flags():
    """As the node gets a model: loaded under inference mode (its weights inference tensors), trained from a
    thread outside it. The swapped blocks keep their own tensors, whose flags the run must give back."""
    with torch.inference_mode():
        patcher = load_sd3()
        samples = fixed_samples(patcher, 2)
    flags = {name: p.requires_grad for name, p in patcher.model.diffusion_model.named_parameters()}
    reference = run_collecting_losses(Trainer(load_sd3(), fixed_samples(patcher, 2), LoraConfig(rank=4),
                                              train_config(steps=2, gradient_checkpointing=True)))
    config = train_config(steps=2, gradient_checkpointing=True, blocks_to_swap=1)
    for _ in range(2):
        assert run_collecting_losses(Trainer(patcher, samples, LoraConfig(rank=4), config)) == reference
    swapped = family_for(patcher.model, config).checkpoint_blocks()[swapped_indices(2, 1)[0]]
    assert all(p.is_inference() for p in swapped.parameters()), "the swapped block has its own tensors back"
    after = {name: p.requires_grad for name, p in patcher.model.diffusion_model.named_parameters()}
    prefix = next(n for n, m in patcher.model.diffusion_model.named_modules() if m is swapped) + "."
    assert {n: f for n, f in after.items() if n.startswith(prefix)} == {
        n: f for n, f in flags.items() if n.startswith(prefix)}


def test_a_swapped_run_holds_one_copy_of_each_weight_it_keeps_on_the_device():
    """A swapped run loads the model after it has set the base weights' flags, and make_autograd_safe then
    replaces the loaded inference tensors. A reference kept to the tensors as they were held every resident
    block twice on the card (Flux fp8 on 12 GB: 5.35 GiB more, out of memory in step 1). Between steps, each
    weight the model held before the run is either still the module's own or gone."""
    with torch.inference_mode():
        patcher = load_sd3()
        samples = fixed_samples(patcher, 2)
    diffusion_model = patcher.model.diffusion_model
    before = [(owner, name, weakref.ref(p)) for owner in diffusion_model.modules()
              for name, p in owner._parameters.items() if p is not None]
    replaced_alive = []

    def between_steps(trainer, reports):
        gc.collect()
        replaced_alive.append(sum(1 for owner, name, ref in before
                                  if ref() is not None and owner._parameters[name] is not ref()))

    config = train_config(steps=2, gradient_checkpointing=True, blocks_to_swap=1)
    Trainer(patcher, samples, LoraConfig(rank=4), config).run(between_steps)
    # The swapped block's own tensors wait in its slots (not in the module) to be put back: all else is gone.
    swapped = family_for(patcher.model, config).checkpoint_blocks()[swapped_indices(2, 1)[0]]
    assert replaced_alive == [sum(1 for _ in swapped.parameters())] * 2


def test_a_lora_loaded_before_training_patches_swapped_blocks_too():
    """Training on top of a LoRA (a LoRA Loader before Train LoRA): ComfyUI patches the weights as it loads
    them; the swapped blocks, which it does not load, must get their patches as well (also after ComfyUI
    unloaded and loaded the model between steps), and lose them after."""
    results = {}
    for swap in (0, 3):
        patcher = new_deep_flux()
        weights = patcher.model.diffusion_model.state_dict()
        # One patched layer in a swapped block (index 1: double_blocks.1) and one in a block that stays.
        keys = ["diffusion_model.double_blocks.1.img_attn.qkv.weight",
                "diffusion_model.double_blocks.0.img_mlp.0.weight"]
        generator = torch.Generator().manual_seed(11)
        diffs = {k: 0.05 * torch.randn(weights[k.removeprefix("diffusion_model.")].shape, generator=generator)
                 for k in keys}
        assert sorted(patcher.add_patches({k: (d,) for k, d in diffs.items()}, 1.0)) == sorted(keys)
        before = {k: v.clone() for k, v in weights.items()}
        config = train_config(steps=3, gradient_checkpointing=True, blocks_to_swap=swap)
        losses = []

        def unload_between_steps(trainer, reports, losses=losses):
            # As a preview's VAE on a small card can make ComfyUI do: the model unloaded whole (which puts
            # back the weights it patched), then loaded again for the next step.
            losses.extend(r.loss for r in reports)
            comfy_compat.unload_models([trainer.patcher])
            trainer.reload_model()

        Trainer(patcher, fixed_samples(patcher), LoraConfig(rank=4), config).run(unload_between_steps)
        results[swap] = losses
        if swap:
            # The swapped run leaves the model unloaded, which takes the patches off (an unswapped one leaves
            # it loaded, patched, as ComfyUI holds a loaded model).
            after = patcher.model.diffusion_model.state_dict()
            assert [k for k in before if not torch.equal(after[k], before[k])] == []
            assert not patcher.backup
        else:
            comfy_compat.unload_models([patcher])
    unpatched = run_collecting_losses(Trainer(deep_flux(), fixed_samples(deep_flux()), LoraConfig(rank=4),
                                              train_config(steps=3, gradient_checkpointing=True, blocks_to_swap=3)))
    assert results[3] == results[0] != unpatched


def fp8_deep_flux():
    """`new_deep_flux` with its weights stored in fp8 (e4m3fn) and computed in fp32, as ComfyUI's loaders set up
    fp8 weights (manual cast: each layer casts its weight when it runs)."""
    config = flux_config(128, 2, [8, 28, 28], depth=3, single=4, context_dim=FLUX_TEXT.context_dim,
                         pooled=FLUX_TEXT.pooled_dim, guidance=True)
    model_config = FLUX_CONFIG_CLASSES["dev"](config)
    model_config.set_inference_dtype(torch.float8_e4m3fn, torch.float32)
    model = model_config.get_model({})
    model.diffusion_model.load_state_dict(new_deep_flux().model.diffusion_model.state_dict())
    return tiny_models._patcher(model)


def test_fp8_stored_blocks_swap_as_they_are_stored_and_train_as_unswapped():
    results = {}
    for swap in (0, 3):
        patcher = fp8_deep_flux()
        blocks = blocks_of(patcher, train_config())
        assert {p.dtype for b in blocks for p in b.parameters() if p.ndim == 2} == {torch.float8_e4m3fn}
        # What visits the device is the block as stored: fp8, one byte per weight.
        visiting = []
        handle = blocks[1].img_attn.qkv.register_forward_pre_hook(
            lambda module, args, visiting=visiting: visiting.append(module.weight.dtype))
        config = train_config(steps=3, gradient_checkpointing=True, blocks_to_swap=swap)
        trainer = Trainer(patcher, fixed_samples(patcher), LoraConfig(rank=4), config)
        results[swap] = (run_collecting_losses(trainer), lora_weights(trainer.network))
        handle.remove()
        assert visiting and set(visiting) == {torch.float8_e4m3fn}
        comfy_compat.unload_models([patcher])
    assert results[3][0] == results[0][0]
    assert all(torch.equal(results[3][1][k], results[0][1][k]) for k in results[0][1])


def test_a_swapped_run_resumes_exactly():
    patcher = deep_flux()
    config = train_config(steps=4, gradient_checkpointing=True, blocks_to_swap=2)
    straight = run_collecting_losses(Trainer(patcher, fixed_samples(patcher), LoraConfig(rank=4), config))

    first = Trainer(deep_flux(), fixed_samples(patcher), LoraConfig(rank=4), config)
    first_losses = []

    def stop_after_two(trainer, reports):
        first_losses.extend(r.loss for r in reports)
        return trainer.state.step < 2

    first.run(stop_after_two)
    state, weights = copy.deepcopy(first.resume_state()), lora_weights(first.network)
    second = Trainer(deep_flux(), fixed_samples(patcher), LoraConfig(rank=4), config)
    second.network.load_state_dict(weights)
    second.load_resume_state(state)
    assert first_losses + run_collecting_losses(second) == straight


def test_swapped_indices_spread_the_blocks_between_unswapped_ones():
    assert swapped_indices(7, 0) == []
    assert swapped_indices(7, 1) == [3]
    assert swapped_indices(7, 3) == [1, 3, 5]
    assert swapped_indices(7, 6) == [1, 2, 3, 4, 5, 6]
    assert swapped_indices(7, 7) == list(range(7))
    # Flux dev's 57 blocks (19 double, 38 single) with 16 swapped: the first block never, none twice.
    flux = swapped_indices(57, 16)
    assert flux[:4] == [3, 6, 10, 13] and flux[-1] == 53 and len(set(flux)) == 16


def test_the_activation_estimate_in_numbers():
    # Flux dev at 1024x1024, batch 1: 64x64 patches of the 128x128 latent, 512 T5 tokens in the sequence,
    # width 3072, bf16, 57 blocks, a double block of 339 M parameters stored in fp8 (cast to bf16 per layer).
    hidden_state = 1 * (4096 + 512) * 3072
    flux = block_hidden_states([3072] * 57, 1, 4096, 512)
    assert flux == [hidden_state] * 57
    expected = (57 + 24) * hidden_state * 2 + 339_000_000 * 2
    assert activation_bytes(flux, 2, 339_000_000, weights_cast=True) == expected
    # Weights stored in the compute dtype are not cast: no extra copy.
    assert activation_bytes(flux, 2, 339_000_000, weights_cast=False) == (57 + 24) * hidden_state * 2
    # SDXL's UNet at 1024x1024: every latent pixel at 320 channels, a quarter of them at 640, a sixteenth at
    # 1280; the text is not in the sequence (cross-attention).
    assert block_hidden_states([320, 640, 1280], 2, 128 * 128, 0) == [2 * 16384 * 320, 2 * 4096 * 640,
                                                                      2 * 1024 * 1280]


def test_a_block_is_as_wide_as_its_first_convolution_takes_else_its_first_linear_layer():
    """A UNet's ResBlock has a timestep-embedding linear layer of the widest size at every level."""
    res_block = torch.nn.Module()
    res_block.in_layers = torch.nn.Sequential(torch.nn.GroupNorm(32, 320), torch.nn.Conv2d(320, 640, 3))
    res_block.emb_layers = torch.nn.Linear(1280, 640)
    assert block_width(res_block) == 320
    assert block_width(torch.nn.Sequential(torch.nn.Linear(3072, 9216), torch.nn.Linear(9216, 3072))) == 3072


def test_the_auto_choice_swaps_the_fewest_blocks_that_fit():
    mib = 1 << 20
    blocks = [100 * mib] * 10  # 1000 MiB of blocks
    # Fixed needs: 50 + 10 + 40 = 100 MiB; the margin is 512 MiB + 5 % of what is available.
    estimate = MemoryEstimate(rest_of_model=50 * mib, lora=10 * mib, activations=40 * mib, available=2000 * mib)
    assert estimate.margin == 512 * mib + 100 * mib
    # Everything on the card: 1100 MiB <= 2000 - 612.
    assert bytes_on_device(blocks, 0, estimate) == 1100 * mib
    assert fewest_blocks_that_fit(blocks, estimate) == 0
    # The margin holds for the whole model too: 1100 MiB fit 1100 available, not 1100 less 567.
    exact = MemoryEstimate(rest_of_model=50 * mib, lora=10 * mib, activations=40 * mib, available=1100 * mib)
    assert fewest_blocks_that_fit(blocks, exact) > 0
    # Blocks of 200 MiB: the model (2100 MiB) does not fit 2000 available less the margin: 2000 - 612
    # = 1388 MiB of budget. With n swapped: 100 + (10 - n) * 200 + 3 * 200 for n >= 3 (three buffers for
    # swapped blocks to visit in); 2700 - 200 n <= 1388 from n = 7 (1300).
    large = [200 * mib] * 10
    tight = MemoryEstimate(rest_of_model=50 * mib, lora=10 * mib, activations=40 * mib, available=2000 * mib)
    assert [bytes_on_device(large, n, tight) // mib for n in (0, 1, 4, 6, 7)] == [2100, 2100, 1900, 1500, 1300]
    assert fewest_blocks_that_fit(large, tight) == 7
    # Blocks of two sizes: each of the three buffers holds the largest swapped block; one swapped block
    # needs one buffer.
    mixed = [300 * mib, 100 * mib, 300 * mib, 100 * mib, 200 * mib, 100 * mib]
    assert swapped_indices(6, 4) == [1, 2, 3, 4]
    assert bytes_on_device(mixed, 4, tight) == (100 + 300 + 100 + 3 * 300) * mib
    assert swapped_indices(6, 1) == [3]
    assert bytes_on_device(mixed, 1, tight) == (100 + 300 + 100 + 300 + 200 + 100 + 100) * mib
    # Nothing fits: every block is swapped (the run tries, with a warning).
    hopeless = MemoryEstimate(rest_of_model=50 * mib, lora=10 * mib, activations=40 * mib, available=600 * mib)
    assert fewest_blocks_that_fit(blocks, hopeless) == 10


def test_auto_plans_the_recorded_steps_memory_and_steps_eagerly_where_it_cannot_fit(caplog):
    """Where a run records CUDA graphs, `auto` plans for their pool (activations twice); on a card where that
    does not fit even with every block swapped, it plans for eager steps and turns the graphs off, rather
    than have the recording run out of memory."""
    mib = 1 << 20
    blocks = [100 * mib] * 10

    def estimate(available, activations):
        return MemoryEstimate(rest_of_model=50 * mib, lora=10 * mib, activations=activations, available=available)

    # 2000 MiB free less the margin (612): 1388. Graphed (activations 2 x 300): 660 + 1000 of blocks does not fit;
    # n swapped leave 660 + (10 - n) x 100 + 3 x 100 of buffers: 1460 at 5, 1360 at 6. Eager: 360 + 1000 fits whole.
    with caplog.at_level(logging.INFO, logger="trainer_core.blockswap"):
        assert blockswap.chosen_swap_plan(blocks, estimate(2000 * mib, 600 * mib), estimate(2000 * mib, 300 * mib),
                                          "batch") == (6, True)
        assert blockswap.chosen_swap_plan(blocks, None, estimate(2000 * mib, 300 * mib), "batch") == (0, False)
        assert "steps run eagerly" not in caplog.text
        # 1300 MiB free less the margin (577): 723. The graphed step needs 660 + 300 of buffers even with every
        # block swapped; the eager one fits with all 10 swapped (360 + 300), not with 9 (760).
        assert blockswap.chosen_swap_plan(blocks, estimate(1300 * mib, 600 * mib), estimate(1300 * mib, 300 * mib),
                                          "batch") == (10, False)
    assert ("a step recorded as a CUDA graph does not fit even with every block swapped; steps run eagerly"
            in caplog.text)


@pytest.mark.parametrize("free_mib, expected", [(1 << 20, 0), (0, 7)])
def test_auto_reads_the_free_memory_says_how_many_it_swaps_and_the_run_reports_it(monkeypatch, caplog, free_mib,
                                                                                   expected):
    # The free memory the run reads (here the CPU's RAM): a terabyte, then nothing at all.
    monkeypatch.setattr(trainer_core.trainer, "device_memory_available", lambda device: free_mib << 20)
    unloads = []
    unload = comfy_compat.unload_models
    monkeypatch.setattr(comfy_compat, "unload_models", lambda models: unloads.append(models) or unload(models))
    patcher = deep_flux()
    trainer = Trainer(patcher, fixed_samples(patcher), LoraConfig(rank=4),
                      train_config(steps=2, gradient_checkpointing=True, blocks_to_swap=-1))
    with caplog.at_level(logging.INFO, logger="trainer_core.blockswap"), TrainingJob(trainer) as job:
        events = list(job.events())
    job.result()
    assert trainer.blocks_swapped == expected
    assert [e.data["blocks_swapped"] for e in events if e.kind == "step"] == [expected, expected]
    assert f"block swap (auto): {expected} of 7 blocks" in caplog.text
    assert ("even with every block swapped the estimate exceeds the free memory" in caplog.text) == (expected == 7)
    # Where nothing is swapped the model stays as ComfyUI loaded it; where blocks are, it leaves the card
    # before they are stored away and after the run.
    assert len(unloads) == (0 if expected == 0 else 2)


def planned_memory(monkeypatch) -> tuple[list[MemoryEstimate], dict, list]:
    """What `auto` plans with, in the test's hands: the estimates it makes (listed as made), and the memory it
    counts as available, `available["bytes"]`: the free memory and what ComfyUI has of the model on the device
    (the newest of `patchers`, which the test appends its patchers to), the free memory set so that the sum is
    that (1 TiB at first)."""
    estimates = []
    estimate_step = blockswap.estimate_step
    monkeypatch.setattr(trainer_core.trainer, "estimate_step",
                        lambda *args, **kwargs: estimates.append(estimate_step(*args, **kwargs)) or estimates[-1])
    available = {"bytes": 1 << 40}
    patchers = []
    monkeypatch.setattr(trainer_core.trainer, "device_memory_available",
                        lambda device: available["bytes"] - patchers[-1].loaded_size())
    return estimates, available, patchers


def test_under_cuda_malloc_async_auto_plans_the_pools_memory_and_swaps_more(monkeypatch, caplog):
    """A ComfyUI server allocates through cudaMallocAsync, whose pool kept up to twice a step's activations beyond
    the live memory on the GPU (the node ran out of memory at the eager estimate, and SD3.5 Large on 12 GB at the
    eager estimate and one more set): there `auto` counts the activations three times though the steps are not
    recorded. Here (no GPU) the allocator is said to be cudaMallocAsync, and the free memory is set between what
    the eager estimate and one more set of activations need with nothing swapped and what the pooled one needs."""
    estimates, available, patchers = planned_memory(monkeypatch)

    def swapped(allocator_is_async: bool) -> int:
        monkeypatch.setattr(trainer_core.trainer, "under_cuda_malloc_async", lambda device: allocator_is_async)
        patcher = deep_flux()
        patchers.append(patcher)
        trainer = Trainer(patcher, fixed_samples(patcher), LoraConfig(rank=4),
                          train_config(steps=1, gradient_checkpointing=True, blocks_to_swap=-1))
        estimates.clear()
        with TrainingJob(trainer) as job:
            list(job.events())
        job.result()
        return trainer.blocks_swapped

    assert swapped(False) == 0
    eager = estimates[-1]
    blocks = [tensor_bytes(b) for b in blocks_of(deep_flux(), train_config(gradient_checkpointing=True))]
    # The eager step with every block on the card, and one and a half times its activations more: fits the eager
    # estimate (margin included) and one that counts a second set (the eleventh session's), not the pooled one.
    needed = eager.fixed + sum(blocks) + eager.activations * 3 // 2
    available["bytes"] = int((needed + blockswap.MARGIN_BYTES) / (1 - blockswap.MARGIN_SHARE))
    assert swapped(False) == 0
    with caplog.at_level(logging.INFO, logger="trainer_core.blockswap"):
        count = swapped(True)
    pooled = estimates[-1]
    assert pooled.activations == 3 * eager.activations
    assert count == fewest_blocks_that_fit(blocks, pooled) > 0
    assert f"block swap (auto): {count} of {len(blocks)} blocks" in caplog.text


def test_wrong_settings_are_named():
    with pytest.raises(ConfigError, match=r"^train\.blocks_to_swap: needs gradient_checkpointing on"):
        train_config(gradient_checkpointing=False, blocks_to_swap=2)
    with pytest.raises(ConfigError, match=r"^train\.blocks_to_swap: must be an integer from 0 to 1000, or -1"):
        train_config(gradient_checkpointing=True, blocks_to_swap=-2)
    patcher = deep_flux()
    trainer = Trainer(patcher, fixed_samples(patcher), LoraConfig(rank=4),
                      train_config(steps=1, gradient_checkpointing=True, blocks_to_swap=8))
    with pytest.raises(ConfigError, match=r"^train\.blocks_to_swap: 8 is more than the 7 blocks this model has"):
        trainer.run()


class PreviewHook(JobHook):
    """A preview as SampleHook makes one, without the VAE: ComfyUI's sampler on the trained patcher (which
    loads the model through ComfyUI's model management), then the model loaded back for training."""

    every = 1

    def __init__(self):
        self.latents = []

    def on_step(self, trainer):
        generator = torch.Generator().manual_seed(7)
        context = torch.randn(1, 8, FLUX_TEXT.context_dim, generator=generator)
        positive = [[context, {"pooled_output": torch.randn(1, FLUX_TEXT.pooled_dim, generator=generator),
                               "guidance": 3.5}]]
        empty = torch.zeros(1, 16, 16, 16)
        noise = comfy.sample.prepare_noise(empty, 3)
        self.latents.append(comfy.sample.sample(trainer.patcher, noise, 2, 1.0, "euler", "simple", positive,
                                                positive, empty, seed=3, disable_pbar=True))
        trainer.reload_model()
        return []


def test_previews_during_a_swapped_run_equal_those_of_an_unswapped_one():
    results = {}
    for swap in (0, 3):
        patcher = deep_flux()
        hook = PreviewHook()
        trainer = Trainer(patcher, fixed_samples(patcher), LoraConfig(rank=4),
                          train_config(steps=3, gradient_checkpointing=True, blocks_to_swap=swap))
        with TrainingJob(trainer, [hook]) as job:
            losses = [e.data["loss"] for e in job.events() if e.kind == "step"]
        job.result()
        results[swap] = (losses, hook.latents)
    assert results[3][0] == results[0][0]
    assert len(results[3][1]) == 2
    assert all(torch.equal(a, b) for a, b in zip(results[3][1], results[0][1], strict=True))


def test_a_swapped_run_starts_from_a_model_comfyui_loaded_partially_and_leaves_it_unloaded():
    reference = run_collecting_losses(Trainer(deep_flux(), fixed_samples(deep_flux()), LoraConfig(rank=4),
                                              train_config(steps=2, gradient_checkpointing=True)))
    patcher = deep_flux()
    comfy.model_management.load_models_gpu([patcher])
    # ComfyUI's lowvram state, as after a generation on a card too small for the model: layers cast
    # their weights at each call, the model marked as partially loaded.
    patcher.partially_unload(patcher.offload_device, memory_to_free=patcher.model_size() // 2)
    assert patcher.model.model_lowvram
    assert any(getattr(m, "comfy_cast_weights", False) for m in patcher.model.diffusion_model.modules())
    config = train_config(steps=2, gradient_checkpointing=True, blocks_to_swap=3)
    trainer = Trainer(patcher, fixed_samples(patcher), LoraConfig(rank=4), config)
    assert run_collecting_losses(trainer) == reference
    assert not patcher.model.model_lowvram and patcher.model.model_loaded_weight_memory == 0
    assert not any(hasattr(m, "prev_comfy_cast_weights") for m in patcher.model.diffusion_model.modules())


def test_compiled_swapped_blocks_train_like_eager_ones_and_compile_once(monkeypatch):
    """Each visit gives a swapped block fresh tensors: compiled code must take them without compiling
    again (dynamo guards on the tensors' shapes and devices, not on which objects they are)."""
    # ComfyUI's CPU attention reads the free memory at every call, which compiled code takes as a
    # constant (test_engine.py): a steady reading, so that only the swap could make it compile again.
    steady = torch._dynamo.disable(lambda dev=None, torch_free_too=False: (16 << 30, 16 << 30) if torch_free_too
                                   else 16 << 30)
    monkeypatch.setattr(comfy.model_management, "get_free_memory", steady)
    patcher = MODEL_FACTORIES["flux_dev"]()
    results = {}
    for mode in ("off", "on"):
        frames, losses = [], []

        def count_frames(trainer, reports, frames=frames, losses=losses):
            losses.extend(r.loss for r in reports)
            frames.append(torch._dynamo.utils.counters["frames"]["total"])

        trainer = Trainer(patcher, fixed_samples(patcher, 2), LoraConfig(rank=4),
                          train_config(steps=3, gradient_checkpointing=True, blocks_to_swap=1, compile_blocks=mode))
        trainer.run(count_frames)
        results[mode] = (losses, frames)
    torch.testing.assert_close(torch.tensor(results["on"][0]), torch.tensor(results["off"][0]), rtol=1e-4, atol=1e-5)
    # The first step compiles; the steps after it, whose swapped block comes with new tensors, do not.
    frames = results["on"][1]
    assert frames[0] > 0 and frames[0] == frames[1] == frames[2]


def test_lora_train_reads_blocks_to_swap_as_a_count_or_auto_and_trains_with_it(files, tmp_path, caplog, capsys):
    config = short_form(files)
    config["train"].update(gradient_checkpointing=True, blocks_to_swap="auto")
    path = write(tmp_path / "auto", config)
    assert cli.main(["--print-config", str(path)]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["train"]["blocks_to_swap"] == -1

    config["train"]["blocks_to_swap"] = "many"
    path = write(tmp_path / "many", config)
    assert cli.main(["train", str(path), "--cpu"]) == cli.EXIT_CONFIG
    assert (f"config.yaml:{line_of(path, 'blocks_to_swap:')}: train.blocks_to_swap: expected an integer >= 0 or "
            "'auto', got 'many'") in caplog.text

    config["train"].update(blocks_to_swap=1, gradient_checkpointing=False)
    path = write(tmp_path / "no_checkpointing", config)
    assert cli.main(["train", str(path), "--cpu"]) == cli.EXIT_CONFIG
    assert (f"config.yaml:{line_of(path, 'blocks_to_swap:')}: train.blocks_to_swap: needs gradient_checkpointing "
            "on") in caplog.text

    caplog.clear()
    config["train"]["gradient_checkpointing"] = True
    path = write(tmp_path / "swapped", config)
    with caplog.at_level(logging.INFO):
        assert cli.main(["train", str(path), "--cpu"]) == 0
    assert "block swap: 1 of 2 blocks" in caplog.text
    assert list((tmp_path / "swapped" / "out" / "tiny").glob("tiny.safetensors"))


def test_every_preview_of_a_swapped_run_the_last_included_finds_the_blocks_swapped(tmp_path, monkeypatch):
    """The last preview, made at the last step, runs inside the training session as the others: with every block
    back in the model ComfyUI would load all of it for the sampler (Flux fp8 with 40 of 57 blocks swapped on a
    12 GB card, and 48 on an 8 GB one: out of memory after the last step; bench/RESULTS.md). The sampler is
    replaced by a recorder here: only where the blocks are when it is called matters."""
    patcher = deep_flux()
    trainer = Trainer(patcher, fixed_samples(patcher), LoraConfig(rank=4),
                      train_config(steps=4, gradient_checkpointing=True, blocks_to_swap=3))
    seen = []

    def record_preview(patcher, vae, encoded, settings):
        modules = list(trainer.family.diffusion_model.modules())
        stand_ins = sum(isinstance(m, blockswap._StandIn) for m in modules)
        lora_hooks = sum(len(m._forward_hooks) for m in modules)
        seen.append((trainer.state.step, stand_ins, lora_hooks))
        return torch.zeros(1, 8, 8, 3)

    monkeypatch.setattr(sampling, "sample_images", record_preview)
    monkeypatch.setattr(sampling.comfy_compat, "unload_models", lambda models: None)
    hook = sampling.SampleHook(SimpleNamespace(patcher=None), None, sampling.SampleSettings(("x",)), 2,
                               tmp_path / "samples")
    with TrainingJob(trainer, [hook]) as job:
        events = list(job.events())
    job.result()
    assert [e.data["step"] for e in events if e.kind == "sample"] == [2, 4]
    # The LoRA's hooks are on (those of the layers outside the swapped blocks, which stand-ins hide here).
    hooks = seen[0][2]
    assert hooks > 0 and seen == [(2, 3, hooks), (4, 3, hooks)]

