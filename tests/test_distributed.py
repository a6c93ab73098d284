"""Gradient buckets of data-parallel training (trainer_core/distributed.py), in two CPU processes over gloo.

Each process trains the same small network on its own inputs; the sums the buckets write back are checked
against gradients computed independently, in one process, from both processes' inputs.
"""

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from trainer_core.cli import import_comfyui

WIDTHS = [12, 24, 24, 16, 8]


def network() -> torch.nn.Sequential:
    torch.manual_seed(0)
    layers = [torch.nn.Linear(a, b) for a, b in zip(WIDTHS, WIDTHS[1:], strict=False)]
    return torch.nn.Sequential(*[m for layer in layers for m in (layer, torch.nn.Tanh())])


def inputs(rank: int, micro_batch: int) -> torch.Tensor:
    return torch.randn(3, WIDTHS[0], generator=torch.Generator().manual_seed(100 * rank + micro_batch))


def local_gradients(micro_batches: int, ranks: int) -> list[torch.Tensor]:
    """What the buckets must give: every rank's gradients of every micro-batch, summed, without any hook."""
    model = network()
    for rank in range(ranks):
        for micro_batch in range(micro_batches):
            model(inputs(rank, micro_batch)).square().mean().backward()
    return [p.grad.clone() for p in model.parameters()]


def train_one_step(rank: int, init_file: str, micro_batches: int, results) -> None:
    # A spawned process imports the engine afresh: ComfyUI first, in CPU mode, as the conftest does.
    import_comfyui(cpu=True)
    from trainer_core.distributed import GradientBuckets

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        model = network()
        parameters = list(model.parameters())
        # 800 bytes: the ten parameters (96 to 2304 bytes each) fall into several buckets.
        buckets = GradientBuckets(parameters, bucket_bytes=800)
        launched_before_last_backward = None
        for micro_batch in range(micro_batches):
            if micro_batch == micro_batches - 1:
                launched_before_last_backward = len(buckets.launched)
                buckets.arm()
            model(inputs(rank, micro_batch)).square().mean().backward()
        launched_during_backward = len(buckets.launched)
        buckets.finish()
        results[rank] = {"bucket_count": len(buckets.buckets), "launched_before": launched_before_last_backward,
                         "launched_during": launched_during_backward,
                         "gradients": [p.grad.clone() for p in parameters]}
    finally:
        dist.destroy_process_group()


def run_two_processes(tmp_path, micro_batches: int) -> dict:
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(train_one_step, args=(str(tmp_path / "rendezvous"), micro_batches, results), nprocs=2)
        return dict(results)


def test_buckets_sum_every_gradient_over_the_processes_while_backward_runs(tmp_path):
    results = run_two_processes(tmp_path, micro_batches=1)
    expected = local_gradients(micro_batches=1, ranks=2)
    for rank in (0, 1):
        assert results[rank]["bucket_count"] >= 3
        # Every bucket left during backward: none waited for the optimizer's step.
        assert results[rank]["launched_during"] == results[rank]["bucket_count"]
        for got, want in zip(results[rank]["gradients"], expected, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


def test_with_accumulation_only_the_last_micro_batch_reduces_and_the_sum_holds_all(tmp_path):
    results = run_two_processes(tmp_path, micro_batches=3)
    expected = local_gradients(micro_batches=3, ranks=2)
    for rank in (0, 1):
        assert results[rank]["launched_before"] == 0
        assert results[rank]["launched_during"] == results[rank]["bucket_count"]
        for got, want in zip(results[rank]["gradients"], expected, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
