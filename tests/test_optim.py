"""The fused 8-bit AdamW (trainer_core/optim.py) against bitsandbytes' per-tensor AdamW8bit, on the CPU.

bitsandbytes runs its 8-bit optimizers on the CPU with the same blockwise quantisation (blocks of 256)
as its CUDA kernels; the fused update must give bit-identical weights and state there.
"""

import bitsandbytes
import pytest
import torch
from test_engine import fixed_samples, train_config
from tiny_models import MODEL_FACTORIES

from trainer_core import export
from trainer_core.config import LoraConfig
from trainer_core.optim import QUANT_STATE, FusedAdamW8bit
from trainer_core.trainer import Trainer

# Shapes as a LoRA has them: 8-bit state from 4096 elements on, some ending mid-block (16 x 330 = 5280
# = 20 blocks + 160), one a whole number of blocks (16 x 256), conv-shaped, and small ones kept in
# 32-bit state (under 4096 elements).
SHAPES = [(16, 330), (330, 16), (16, 256), (32, 16, 3, 3), (64, 16, 1, 1), (4, 100), (100, 4), (7,)]


def parameters(seed: int = 0) -> list[torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=generator)) for shape in SHAPES]


def gradients(step: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1000 + step)
    # Scaled per tensor, so blocks of one flat buffer differ in magnitude as LoRA tensors do.
    return [torch.randn(shape, generator=generator) * 10.0 ** (i % 3 - 1) for i, shape in enumerate(SHAPES)]


def two_groups(params):
    """Each group with tensors in 8-bit and in 32-bit state, its own lr and weight decay."""
    return [{"params": [params[i] for i in (0, 2, 5)], "lr": 2e-3, "weight_decay": 0.1},
            {"params": [params[i] for i in (1, 3, 4, 6, 7)], "lr": 5e-3, "weight_decay": 0.0}]


def step_both(optimizers, params_pairs, step, skip=()):
    for optimizer, params in zip(optimizers, params_pairs, strict=True):
        for index, (param, grad) in enumerate(zip(params, gradients(step), strict=True)):
            param.grad = None if index in skip else grad.clone()
        for group in optimizer.param_groups:
            group["lr"] *= 0.9  # the trainer's schedule sets the lr before every step
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def assert_same_state(fused: FusedAdamW8bit, reference: bitsandbytes.optim.AdamW8bit):
    ours, theirs = fused.state_dict(), reference.state_dict()
    assert ours["state"].keys() == theirs["state"].keys()
    for index, state in theirs["state"].items():
        assert ours["state"][index]["step"] == state["step"]
        expected = state[QUANT_STATE]
        assert ours["state"][index][QUANT_STATE].keys() == expected.keys()
        for name, tensor in expected.items():
            assert torch.equal(ours["state"][index][QUANT_STATE][name], tensor), (index, name)
    assert [{k: v for k, v in g.items() if k in ("lr", "weight_decay", "params")} for g in ours["param_groups"]] == \
        [{k: v for k, v in g.items() if k in ("lr", "weight_decay", "params")} for g in theirs["param_groups"]]


@pytest.mark.parametrize("grouped", [False, True], ids=["one-group", "two-groups"])
def test_fused_update_equals_bitsandbytes_per_tensor_update(grouped):
    ours, theirs = parameters(), parameters()
    arrange = two_groups if grouped else (lambda params: params)
    fused = FusedAdamW8bit(arrange(ours), lr=3e-3, weight_decay=0.01)
    reference = bitsandbytes.optim.AdamW8bit(arrange(theirs), lr=3e-3, weight_decay=0.01)
    assert len(fused._packs) == (4 if grouped else 2), "8-bit and 32-bit state each in one buffer per group"
    for step in range(6):
        step_both([fused, reference], [ours, theirs], step)
        for mine, expected in zip(ours, theirs, strict=True):
            assert torch.equal(mine, expected), f"step {step}: a weight of shape {tuple(expected.shape)} differs"
    assert_same_state(fused, reference)
    assert any(s[QUANT_STATE]["state1"].dtype == torch.uint8 for s in fused.state_dict()["state"].values())
    # The weights moved: the test compares an update, not two untouched copies.
    assert not torch.equal(ours[0], parameters()[0])


def test_a_parameter_without_gradient_is_left_alone_as_bitsandbytes_does():
    """A layer that did not run has no gradient: no update, no weight decay, its step count stays."""
    ours, theirs = parameters(), parameters()
    fused = FusedAdamW8bit(ours, lr=3e-3, weight_decay=0.1)
    reference = bitsandbytes.optim.AdamW8bit(theirs, lr=3e-3, weight_decay=0.1)
    for step, skip in enumerate([(), (0, 5), (), (1,), ()]):
        step_both([fused, reference], [ours, theirs], step, skip)
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True))
    assert_same_state(fused, reference)
    steps = {i: s["step"] for i, s in fused.state_dict()["state"].items()}
    assert steps[0] == 4 and steps[1] == 4 and steps[2] == 5


def test_state_round_trips_through_a_checkpoint_and_resumes_exactly():
    straight, resumed = parameters(), parameters()
    first = FusedAdamW8bit(straight, lr=3e-3)
    for step in range(3):
        step_both([first], [straight], step)
    skeleton, tensors = export.flatten_state(first.state_dict())
    weights = [p.detach().clone() for p in straight]

    with torch.no_grad():
        for param, weight in zip(resumed, weights, strict=True):
            param.copy_(weight)
    second = FusedAdamW8bit(resumed, lr=1.0)  # the saved lr comes back with the state
    second.load_state_dict(export.unflatten_state(skeleton, tensors))
    for step in range(3, 6):
        step_both([first], [straight], step)
        step_both([second], [resumed], step)
    assert all(torch.equal(a, b) for a, b in zip(straight, resumed, strict=True))


def test_a_checkpoint_of_the_per_tensor_optimizer_resumes_in_the_fused_one():
    """Checkpoints written before the fused optimizer (bitsandbytes' own state_dict) still resume exactly."""
    theirs, ours = parameters(), parameters()
    reference = bitsandbytes.optim.AdamW8bit(theirs, lr=3e-3, weight_decay=0.01)
    for step in range(3):
        step_both([reference], [theirs], step)
    skeleton, tensors = export.flatten_state(reference.state_dict())
    with torch.no_grad():
        for param, weight in zip(ours, theirs, strict=True):
            param.copy_(weight)
    fused = FusedAdamW8bit(ours, lr=3e-3, weight_decay=0.01)
    fused.load_state_dict(export.unflatten_state(skeleton, tensors))
    for step in range(3, 6):
        step_both([fused, reference], [ours, theirs], step)
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True))
    assert_same_state(fused, reference)


@pytest.mark.parametrize("saved_by, shapes, message", [
    ("adamw8bit", SHAPES[:-1], "parameter groups of [7] tensors, this run's optimizer [8]"),
    ("adamw8bit", [(s[0] * 2, *s[1:]) for s in SHAPES], "resume with the optimizer and LoRA settings"),
    ("adamw", SHAPES, "was not written by adamw8bit"),
])
def test_a_state_that_does_not_fit_is_refused_and_nothing_changes(saved_by, shapes, message):
    generator = torch.Generator().manual_seed(0)
    other = [torch.nn.Parameter(torch.randn(shape, generator=generator)) for shape in shapes]
    if saved_by == "adamw":
        other_optimizer = torch.optim.AdamW(other, lr=1e-3)  # keys exp_avg / exp_avg_sq
    else:
        other_optimizer = bitsandbytes.optim.AdamW8bit(other, lr=1e-3)
    for param in other:
        param.grad = torch.ones_like(param)
    other_optimizer.step()
    ours = parameters()
    fused = FusedAdamW8bit(ours, lr=3e-3)
    step_both([fused], [ours], 0)
    before = fused.state_dict()
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        fused.load_state_dict(other_optimizer.state_dict())
    after = fused.state_dict()
    assert all(torch.equal(after["state"][i][QUANT_STATE][k], v) for i, s in before["state"].items()
               for k, v in s[QUANT_STATE].items()), "a refused state left the optimizer changed"


def trained_fused_and_per_tensor(patcher, samples, lora: LoraConfig, config) -> Trainer:
    """Trains `lora` twice, with the run's fused AdamW8bit and with bitsandbytes' per-tensor AdamW8bit (lr 3e-3,
    weight decay 0.01, as `config` must say), checks that both LoRAs are equal bit for bit, and returns the
    fused run's trainer."""
    fused = Trainer(patcher, samples, lora, config)
    reference = Trainer(patcher, samples, lora, config)
    assert isinstance(fused.optimizer, FusedAdamW8bit)
    reference.optimizer = bitsandbytes.optim.AdamW8bit(reference.network.parameters(), lr=3e-3, weight_decay=0.01)
    fused.run()
    reference.run()
    ours, theirs = fused.network.state_dict(), reference.network.state_dict()
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    return fused


def test_trainer_with_adamw8bit_trains_as_bitsandbytes_per_tensor_optimizer():
    """The default optimizer of a run, through the Trainer (gradient clipping, lr schedule, weight decay)."""
    patcher = MODEL_FACTORIES["sd3"]()
    config = train_config(optimizer="adamw8bit", steps=4, weight_decay=0.01, schedule="cosine", warmup_steps=1,
                          learning_rate=3e-3)
    fused = trained_fused_and_per_tensor(patcher, fixed_samples(patcher), LoraConfig(rank=16, alpha=16), config)
    ours = fused.network.state_dict()
    assert any(not torch.equal(v, fixed) for v, fixed in zip(ours.values(), Trainer(
        patcher, fixed_samples(patcher), LoraConfig(rank=16, alpha=16), config).network.state_dict().values(),
        strict=True)), "the LoRA did not train"
    eight_bit = [s for s in fused.optimizer.state_dict()["state"].values() if s[QUANT_STATE]["state1"].dtype ==
                 torch.uint8]
    assert eight_bit, "the tiny model's LoRA should have tensors of >= 4096 elements in 8-bit state"
