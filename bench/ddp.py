"""Data-parallel throughput of the engine: `torchrun --standalone --nproc_per_node N bench/ddp.py`.

Every rank builds the same full-size random model (bench/architectures.py) and the same random samples,
and trains with `trainer_core.distributed.ShardedTrainer` (NCCL on GPUs) at a global batch of N (one
sample per GPU): 1024², rank 16, bf16, per-block checkpointing, AdamW; LoRA gradients summed in buckets
while backward runs (distributed.GradientBuckets). Rank 0 prints the median step
time after the warm-up and the images per second; run it with N = 1 and N = 2 to compare.
"""

import argparse
import itertools
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench import import_host  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="sd35l", help="sdxl, sd35m, sd35l or flux")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--compile-blocks", choices=("auto", "on", "off"), default="auto",
                        help="the engine's compile_blocks; 'off' saves each run's compile when only the ratio counts")
    args = parser.parse_args()
    import_host(cpu=False)  # under torchrun it gives each process its own GPU

    import architectures
    import torch

    from trainer_core import distributed
    from trainer_core.config import LoraConfig, TrainConfig
    from trainer_core.families import family_for
    from trainer_core.trainer import Sample

    device = torch.device("cuda")
    distributed.start("cuda")
    rank, world_size = distributed.world()
    arch = architectures.FULL[args.model]
    patcher = architectures.build(arch, torch.bfloat16, device, check_detection=False)
    config = TrainConfig(steps=args.steps, learning_rate=1e-4, batch_size=world_size, precision="bf16",
                         gradient_checkpointing=True, compile_blocks=args.compile_blocks)
    family = family_for(patcher.model, config)
    latents, texts = architectures.random_dataset(arch, 4 * world_size, args.resolution)
    samples = [Sample(latent, family.conditioning(text.cond, text.pooled, args.resolution, args.resolution))
               for latent, text in zip(latents, texts, strict=True)]
    trainer = distributed.ShardedTrainer(patcher, samples, LoraConfig(rank=16, alpha=16), config)
    stamps = []

    def on_step(_trainer, _reports):
        torch.cuda.synchronize()
        stamps.append(time.perf_counter())

    torch.cuda.reset_peak_memory_stats()
    with torch.inference_mode():
        trainer.run(on_step)
    gaps = [b - a for a, b in itertools.pairwise(stamps)][args.warmup - 1:]
    if rank == 0:
        median = statistics.median(gaps)
        print(f"{arch.label}: {world_size} GPU(s), global batch {world_size}: {median:.3f} s/step, "
              f"{world_size / median:.2f} images/s, peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB "
              f"(rank 0), steps {args.steps}, median of the last {len(gaps)}", flush=True)
    distributed.stop()


if __name__ == "__main__":
    main()
