"""An exponential moving average (EMA) of the LoRA's weights.

After every optimizer step, ema <- decay * ema + (1 - decay) * weights, starting from the weights the
run starts with (B = 0 for a fresh LoRA). The training itself never sees it: the optimizer updates the
raw weights. Previews and the saved LoRA files use the average (`ema_weights`); a checkpoint's resume
state holds the raw weights and the average apart, so a resumed run continues both exactly.
"""

import contextlib

import torch

from .lora import LoraNetwork


class LoraEma:
    def __init__(self, network: LoraNetwork, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"train.ema_decay: must be in (0, 1) for an EMA, got {decay!r}")
        self.decay = float(decay)
        named = list(network.named_parameters())
        self.names = [name for name, _ in named]
        # The parameter objects, not their tensors: the 8-bit optimizer swaps their data for views of its buffers.
        self.params = [p for _, p in named]
        self.average = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        """One step of the recursion: average + (1 - decay) * (weights - average), per tensor."""
        torch._foreach_lerp_(self.average, [p.detach() for p in self.params], 1.0 - self.decay)

    def to(self, device) -> None:
        self.average = [a.to(device) for a in self.average]

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(zip(self.names, self.average, strict=True))

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if not isinstance(state, dict) or set(state) != set(self.names):
            raise ValueError("the checkpoint's EMA state does not fit this LoRA: resume with the LoRA settings "
                             "it was trained with")
        for average, name in zip(self.average, self.names, strict=True):
            if state[name].shape != average.shape:
                raise ValueError(f"the checkpoint's EMA of {name} is {tuple(state[name].shape)}, this LoRA's "
                                 f"{tuple(average.shape)}: resume with the LoRA settings it was trained with")
            average.copy_(state[name])

    @contextlib.contextmanager
    def applied(self):
        """The network holds the average for the duration of the block, its trained weights again after.
        Copied in place: the parameters keep their memory (views of the optimizer's buffers, addresses
        a recorded CUDA graph reads)."""
        with torch.no_grad():
            trained = [p.detach().clone() for p in self.params]
            torch._foreach_copy_([p.detach() for p in self.params], self.average)
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_([p.detach() for p in self.params], trained)


def ema_weights(trainer) -> contextlib.AbstractContextManager:
    """The weights a trainer's LoRA is used and saved with for the duration of a block: its EMA where the
    run keeps one, else the trained weights as they are."""
    return trainer.ema.applied() if trainer.ema is not None else contextlib.nullcontext()
