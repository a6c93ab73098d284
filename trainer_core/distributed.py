"""Data-parallel training over torch.distributed processes (`torchrun --nproc_per_node N -m trainer_core ...`).

Every rank draws each global batch, its caption variants, noise and timesteps whole, from the same seeded
generators as a single process would, and computes the loss of its own shard of it. Each rank's loss is
its shard's share of the batch mean, and LoRA gradients are summed over the ranks as backward produces
them, so every rank steps with the gradient of the whole batch and all ranks keep equal weights: the run
trains the LoRA one process would train on the same global batch (up to float rounding).
"""

import os

import torch
import torch.distributed as dist

from .trainer import Trainer


def world() -> tuple[int, int]:
    """(rank, world size) as torchrun sets them; (0, 1) without torchrun."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def start(device_type: str) -> None:
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo")


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def stop() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def _summed(gradient: torch.Tensor) -> torch.Tensor:
    total = gradient.clone()
    dist.all_reduce(total)
    return total


class ShardedTrainer(Trainer):
    """A Trainer that trains on this rank's shard of every global batch (see the module docstring)."""

    # Its backward all-reduces each gradient as it comes (NCCL), which a CUDA graph does not record here.
    records_graphs = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.rank, self.world_size = world()
        # Runs on each parameter's gradient of every backward, before it is accumulated: with
        # gradient accumulation the micro-batches' sums add up as in one process.
        for parameter in self.network.parameters():
            parameter.register_hook(_summed)

    def loss(self, latents, conditioning, noise, timesteps) -> torch.Tensor:
        count = latents.shape[0]
        start, end = self.rank * count // self.world_size, (self.rank + 1) * count // self.world_size
        # A batch smaller than the world (the last one of a bucket) leaves some ranks without a sample:
        # they run one with weight 0, so every rank's backward reduces the same gradients in the same order.
        weight = (end - start) / count
        if end == start:
            start = min(start, count - 1)
            end = start + 1
        shard = slice(start, end)
        partial = super().loss(latents[shard], {k: v[shard] for k, v in conditioning.items()}, noise[shard],
                               timesteps[shard]) * weight
        # The value reported is the whole batch's loss; the gradient stays this shard's.
        whole = partial.detach().clone()
        dist.all_reduce(whole)
        return partial + (whole - partial.detach())
