"""The validation loss: the training loss on held-out images, at noise and timesteps fixed for the run.

Each held-out sample gets one noise tensor and one timestep, drawn once per run from a generator of its
own seeded with the run's seed, in the samples' order: every evaluation of a run (and of its resumed
continuation) sees the same noisy inputs, so the curve moves only with the LoRA, and the training's own
random streams are left untouched. An evaluation runs between steps with no gradient and the LoRA on
(dropout off); it is the mean over the held-out samples of the per-sample loss the training minimises
(the family's weighting included).
"""

import logging
from collections.abc import Sequence

import torch

from .config import TrainConfig
from .ema import ema_weights
from .job import Event, JobHook
from .trainer import Sample, Trainer

log = logging.getLogger(__name__)

# Keeps the held-out draws apart from the training's, which are seeded with the seed itself.
SEED_OFFSET = 0x5EED_0001


class ValidationSet:
    """Held-out samples with their fixed noise and timesteps, on the training device once first used."""

    def __init__(self, samples: Sequence[Sample], seed: int):
        if not samples:
            raise ValueError("the validation set holds no samples")
        self.samples = list(samples)
        self.seed = seed
        self._prepared: list[tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor, torch.Tensor]] = []

    def _prepare(self, trainer: Trainer) -> None:
        device = trainer.device
        generator = torch.Generator(device).manual_seed(self.seed + SEED_OFFSET)
        family = trainer.family
        for sample in self.samples:
            # Copies: tensors made under ComfyUI's inference mode cannot be used outside it otherwise.
            latents = sample.latents.to(device).clone().unsqueeze(0)
            conditioning = {k: v.to(device).clone().unsqueeze(0) for k, v in sample.conditioning.items()}
            noise = family.prepare_noise(torch.randn(latents.shape, generator=generator, device=device), generator)
            timesteps = family.sample_timesteps(latents, generator)
            self._prepared.append((latents, conditioning, noise.to(latents), timesteps))

    def batches(self, batch_size: int):
        """(latents, conditioning, noise, timesteps, count) of batches of equal shape, in sample order."""
        groups: dict[tuple, list[int]] = {}
        for index, (latents, conditioning, _, _) in enumerate(self._prepared):
            shape = (tuple(latents.shape), *sorted((k, tuple(v.shape)) for k, v in conditioning.items()))
            groups.setdefault(shape, []).append(index)
        for indices in groups.values():
            for start in range(0, len(indices), batch_size):
                chosen = [self._prepared[i] for i in indices[start:start + batch_size]]
                keys = chosen[0][1]
                yield (torch.cat([c[0] for c in chosen]), {k: torch.cat([c[1][k] for c in chosen]) for k in keys},
                       torch.cat([c[2] for c in chosen]), torch.cat([c[3] for c in chosen]), len(chosen))

    @torch.no_grad()
    def loss(self, trainer: Trainer) -> float:
        """The mean loss over the held-out samples with the LoRA as it is now (call between steps, with the
        network in eval mode, as JobHooks run)."""
        if not self._prepared:
            self._prepare(trainer)
        total = torch.zeros((), dtype=torch.float64, device=trainer.device)
        for latents, conditioning, noise, timesteps, count in self.batches(trainer.config.batch_size):
            # The mean over the batch: times its size, the batches' sum is the set's. Trainer's own loss, not a
            # subclass's: data-parallel ranks share theirs through a collective, and only the first validates.
            total += Trainer.loss(trainer, latents, conditioning, noise, timesteps).double() * count
        return float(total) / len(self.samples)


class ValidationHook(JobHook):
    """Evaluates the validation loss every `train.validation_every` steps and at the last step of a run that
    reaches it, as "validation" events ({"step", "total_steps", "validation_loss"})."""

    # At the last step, inside the training session: the model is loaded as for the steps (its blocks swapped,
    # if they are) and the LoRA attached, which after the session they no longer are.
    at_last_step = True

    def __init__(self, validation: ValidationSet, every: int):
        self.validation = validation
        self.every = every

    def on_step(self, trainer: Trainer) -> list[Event]:
        # The LoRA as it is used and saved: its EMA where the run keeps one.
        with ema_weights(trainer):
            loss = self.validation.loss(trainer)
        data = {"step": trainer.state.step, "total_steps": trainer.config.steps, "validation_loss": loss}
        return [Event("validation", data)]


def validation_hooks(held_out: Sequence[Sample], config: TrainConfig) -> list[JobHook]:
    """The run's validation hook, on the dataset's held-out samples (`DatasetReport.validation`); none without."""
    if not held_out:
        if config.validation_every:
            log.warning("train.validation_every is %d, but the dataset holds no images out: set the dataset's "
                        "validation_split or validation_folder to see a validation loss", config.validation_every)
        return []
    return [ValidationHook(ValidationSet(held_out, config.seed), config.validation_every)]
