"""Data-parallel training over torch.distributed processes (`torchrun --nproc_per_node N -m trainer_core ...`).

Every rank draws each global batch, its caption variants, noise and timesteps whole, from the same seeded
generators as a single process would, and computes the loss of its own shard of it. Each rank's loss is
its shard's share of the batch mean, and LoRA gradients are summed over the ranks, so every rank steps
with the gradient of the whole batch and all ranks keep equal weights: the run trains the LoRA one process
would train on the same global batch (up to float rounding).

The sum runs in buckets of about `BUCKET_BYTES` while backward goes on (`GradientBuckets`): one small
all-reduce per LoRA tensor, each making the compute stream wait, cost two GPUs most of their second card.
"""

import os
from collections.abc import Sequence

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


# What DDP takes by default: large enough that NCCL runs near its bandwidth, small enough that the
# first bucket leaves while most of backward is still to run.
BUCKET_BYTES = 25 * 2**20


class GradientBuckets:
    """Sums the gradients of `parameters` over all ranks, bucket by bucket, as backward accumulates them.

    Buckets follow the parameters in reverse (backward reaches the last blocks' LoRA first). Once every
    gradient of a bucket is accumulated in the backward of a step's last micro-batch, it is copied into
    the bucket's flat buffer and all-reduced asynchronously; the earlier micro-batches of a step only
    accumulate locally (a sum of sums is the same sum). Buckets leave strictly in order, so every rank
    issues the same collectives in the same order. `finish` waits for them and writes the sums back.
    """

    def __init__(self, parameters: Sequence[torch.nn.Parameter], bucket_bytes: int = BUCKET_BYTES):
        self.buckets: list[list[torch.nn.Parameter]] = [[]]
        size = 0
        for parameter in reversed(list(parameters)):
            nbytes = parameter.numel() * parameter.element_size()
            if self.buckets[-1] and size + nbytes > bucket_bytes:
                self.buckets.append([])
                size = 0
            self.buckets[-1].append(parameter)
            size += nbytes
        self.bucket_of = {id(p): index for index, bucket in enumerate(self.buckets) for p in bucket}
        self.flat = [None] * len(self.buckets)
        self.armed = False
        self._reset()
        for parameter in parameters:
            parameter.register_post_accumulate_grad_hook(self._accumulated)

    def _reset(self) -> None:
        self.waiting = [len(bucket) for bucket in self.buckets]
        self.launched: list = []

    def arm(self) -> None:
        """The next backward is the step's last: reduce its gradients as they become whole."""
        self._reset()
        self.armed = True

    def _accumulated(self, parameter: torch.nn.Parameter) -> None:
        if not self.armed:
            return
        self.waiting[self.bucket_of[id(parameter)]] -= 1
        while len(self.launched) < len(self.buckets) and self.waiting[len(self.launched)] == 0:
            self._launch(len(self.launched))

    def _gradients(self, index: int) -> list[torch.Tensor]:
        # A parameter no loss reached this step has no gradient; it takes part as zeros.
        return [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.buckets[index]]

    def _launch(self, index: int) -> None:
        pieces = [g.reshape(-1) for g in self._gradients(index)]
        if self.flat[index] is None:
            self.flat[index] = torch.cat(pieces)
        else:
            torch.cat(pieces, out=self.flat[index])
        self.launched.append(dist.all_reduce(self.flat[index], async_op=True))

    def finish(self) -> None:
        """Launches what backward left (parameters it never reached), waits, and writes the sums back."""
        while len(self.launched) < len(self.buckets):
            self._launch(len(self.launched))
        self.armed = False
        for index, work in enumerate(self.launched):
            work.wait()
            offset = 0
            for parameter in self.buckets[index]:
                count = parameter.numel()
                summed = self.flat[index][offset:offset + count].view_as(parameter)
                if parameter.grad is None:
                    parameter.grad = summed.clone()
                else:
                    parameter.grad.copy_(summed)
                offset += count
        self.launched = []


class ShardedTrainer(Trainer):
    """A Trainer that trains on this rank's shard of every global batch (see the module docstring)."""

    # Its backward launches all-reduces from gradient hooks (NCCL), which a CUDA graph does not record here.
    records_graphs = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.rank, self.world_size = world()
        # Buckets follow the parameters in reverse, and backward reaches the text encoders' LoRA (where it
        # trains) after the diffusion model's: theirs go first here, so they come last.
        text = list(self.text_encoding.loras.parameters()) if self.text_encoding is not None else []
        self.buckets = GradientBuckets([*text, *self.network.parameters()])
        self._micro_batch = 0

    def step(self) -> torch.Tensor:
        self._micro_batch = 0
        try:
            return super().step()
        finally:
            self.buckets.armed = False

    def _forward_backward(self, *tensors) -> torch.Tensor:
        self._micro_batch += 1
        last = self._micro_batch == self.config.gradient_accumulation
        if last:
            self.buckets.arm()
        loss = super()._forward_backward(*tensors)
        if last:
            self.buckets.finish()
        return loss

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
