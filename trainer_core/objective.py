"""Per-sample terms of the loss that come with the data: a mask over the latent grid, a loss weight
(regularisation datasets) and differential output preservation (DOP).

They ride in a Sample's conditioning dicts beside the family's tensors, under the names below, so that
they are drawn with the caption they belong to, stacked into batches, moved to the device and sharded
like the rest of the conditioning; `split_terms` takes them out before the model sees the conditioning.
A dataset that uses none of them adds none, and the loss is then the plain mean.

- LOSS_MASK (1, h, w): the weight of each latent cell, in [0, 1]; it multiplies the per-element loss
  (broadcast over the channels) before the mean over all elements, as ai-toolkit and kohya weight it.
  A cell of weight 0 contributes exactly nothing to the loss or its gradient.
- LOSS_WEIGHT (): the sample's loss multiplier.
- PRESERVE_WEIGHT () and PRESERVE + <family key>: DOP (ai-toolkit's `diff_output_preservation`).
  The conditioning of the caption with the trigger word replaced by the class word, and the
  multiplier of the preservation term: 0 for captions without the trigger word (no DOP for them).
"""

from dataclasses import dataclass

import torch

LOSS_MASK = "loss_mask"
LOSS_WEIGHT = "loss_weight"
PRESERVE_WEIGHT = "preserve_weight"
PRESERVE = "preserve:"


@dataclass
class LossTerms:
    mask: torch.Tensor | None = None  # (B, 1, h, w)
    weight: torch.Tensor | None = None  # (B,)
    preserve_conditioning: dict[str, torch.Tensor] | None = None
    preserve_weight: torch.Tensor | None = None  # (B,)


def split_terms(conditioning: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], LossTerms]:
    """The family's conditioning of a batch, and the loss terms that rode with it."""
    own = {k: v for k, v in conditioning.items() if k not in (LOSS_MASK, LOSS_WEIGHT, PRESERVE_WEIGHT)
           and not k.startswith(PRESERVE)}
    preserve = {k.removeprefix(PRESERVE): v for k, v in conditioning.items() if k.startswith(PRESERVE)}
    terms = LossTerms(conditioning.get(LOSS_MASK), conditioning.get(LOSS_WEIGHT), preserve or None,
                      conditioning.get(PRESERVE_WEIGHT))
    return own, terms


def masked(per_element: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The per-element loss (B, C, h, w) weighted by the latent-grid mask (B, 1, h, w)."""
    return per_element if mask is None else per_element * mask.to(per_element)


def preservation_loss(prediction: torch.Tensor, prior: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """DOP's term: the mean squared distance of the LoRA's prediction on the class-word caption from the
    base model's (`prior`, no gradient), per sample, times the sample's preservation weight, averaged
    over the batch. With one weight for the whole batch this is ai-toolkit's `mse(pred, prior) * m`."""
    per_sample = (prediction.float() - prior.detach().float()).square().flatten(1).mean(1)
    return (per_sample * weight.to(per_sample)).mean()
