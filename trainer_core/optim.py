"""AdamW with 8-bit state (bitsandbytes) as one update over all LoRA parameters.

bitsandbytes' AdamW8bit updates one tensor per call, a kernel launch and Python around each: for
a LoRA's hundreds of small tensors that cost ~70 ms a step on SDXL on an H200 (issue 13). Here the
parameters are views of one flat buffer, and a step is one bitsandbytes call per buffer (one for
8-bit state, one for the small tensors' 32-bit state) with the arithmetic of the per-tensor update:

- 8-bit state is quantised in blocks of BLOCK elements, each block with its own absmax. Each
  tensor's segment starts on a block boundary and is padded with zeros to whole blocks, so every
  block holds the elements it holds in the per-tensor layout. The padding stays zero: its
  gradient is zero, so are its moments (0 is exact in both quantisation maps), and so its update.
- Tensors of fewer than `min_8bit_size` elements keep 32-bit state, as in bitsandbytes. Their
  update is elementwise, so they share a second flat buffer, unpadded.

The state_dict is bitsandbytes' per-parameter one, so a checkpoint written by either optimizer
resumes in the other.
"""

import logging
import math
from dataclasses import dataclass

import bitsandbytes.functional as bnb
import torch
from torch import nn

log = logging.getLogger(__name__)

# Elements per quantisation block of bitsandbytes' 8-bit optimizer state (256 since 0.44).
BLOCK = 256
# Where bitsandbytes' state_dict keeps each parameter's state tensors.
QUANT_STATE = "__bnb_optimizer_quant_state__"


@dataclass(eq=False)
class _Pack:
    """The parameters of one group that share a flat buffer and one kind of optimizer state."""

    group: dict
    params: list[nn.Parameter]
    offsets: list[int]  # where each parameter's segment starts in `flat`
    sizes: list[int]  # each segment's length: the parameter's elements, padded to whole blocks if 8-bit
    pieces: list[int]  # `flat` split into each parameter's elements and its padding, in turn
    eight_bit: bool
    flat: torch.Tensor
    state1: torch.Tensor
    state2: torch.Tensor
    absmax1: torch.Tensor | None
    absmax2: torch.Tensor | None
    steps: list[int]  # each parameter's update count, as bitsandbytes keeps it


def _segments(tensor: torch.Tensor, pack: _Pack, index: int, shaped: bool) -> torch.Tensor:
    segment = tensor[pack.offsets[index]:pack.offsets[index] + pack.sizes[index]]
    if not shaped:
        return segment
    param = pack.params[index]
    return segment[:param.numel()].view(param.shape)


class FusedAdamW8bit(torch.optim.Optimizer):
    """bitsandbytes' AdamW8bit (same defaults, same results) updating all parameters of a group at once.

    The parameters become views of the optimizer's buffers when it is made: move them afterwards
    (`.to(...)`) only once the optimizer is no longer used.
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, min_8bit_size: int = 4096):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.min_8bit_size = min_8bit_size
        self._qmaps = (bnb.create_dynamic_map(signed=True), bnb.create_dynamic_map(signed=False))
        self._packs: list[_Pack] = []
        for group in self.param_groups:
            small = [p for p in group["params"] if p.numel() < min_8bit_size]
            large = [p for p in group["params"] if p.numel() >= min_8bit_size]
            for params, eight_bit in ((large, True), (small, False)):
                if params:
                    self._packs.append(self._pack(group, params, eight_bit))

    def _pack(self, group: dict, params: list[nn.Parameter], eight_bit: bool) -> _Pack:
        kinds = {(p.dtype, p.device) for p in params}
        if len(kinds) > 1:
            raise ValueError(f"FusedAdamW8bit: the parameters of a group must share dtype and device, got {kinds}")
        dtype, device = kinds.pop()
        sizes = [math.ceil(p.numel() / BLOCK) * BLOCK if eight_bit else p.numel() for p in params]
        offsets = [sum(sizes[:i]) for i in range(len(sizes))]
        total = sum(sizes)
        flat = torch.zeros(total, dtype=dtype, device=device)
        pieces = [n for p, size in zip(params, sizes, strict=True) for n in (p.numel(), size - p.numel())]
        state_dtype = torch.uint8 if eight_bit else torch.float32
        states = [torch.zeros(total, dtype=state_dtype, device=device) for _ in range(2)]
        absmaxes = [torch.zeros(total // BLOCK, dtype=torch.float32, device=device) if eight_bit else None
                    for _ in range(2)]
        pack = _Pack(group, params, offsets, sizes, pieces, eight_bit, flat, *states, *absmaxes, [0] * len(params))
        with torch.no_grad():
            for index, param in enumerate(params):
                view = _segments(flat, pack, index, shaped=True)
                view.copy_(param)
                param.data = view
        if eight_bit:
            self._qmaps = tuple(qmap.to(device) for qmap in self._qmaps)
        return pack

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for pack in self._packs:
            grads = [p.grad for p in pack.params]
            # The gradients in the flat layout, padding zero. Made for the step only: between steps its
            # memory serves the next forward and backward.
            flat_grad = torch.zeros_like(pack.flat)
            views = [piece.view(p.shape) for piece, p in zip(flat_grad.split(pack.pieces)[::2], pack.params,
                                                              strict=True)]
            if all(g is not None for g in grads) and min(pack.steps) == max(pack.steps):
                torch._foreach_copy_(views, grads)
                pack.steps = [pack.steps[0] + 1] * len(pack.steps)
                self._update(pack, flat_grad, slice(None), pack.steps[0])
            else:
                # Some parameter got no gradient (its layer did not run), now or before: bitsandbytes
                # leaves such a parameter and its step count alone, so each is updated on its own.
                for index, grad in enumerate(grads):
                    if grad is None:
                        continue
                    views[index].copy_(grad)
                    pack.steps[index] += 1
                    start, size = pack.offsets[index], pack.sizes[index]
                    self._update(pack, flat_grad, slice(start, start + size), pack.steps[index])
        return loss

    def _update(self, pack: _Pack, grad: torch.Tensor, part: slice, step: int) -> None:
        """bitsandbytes' update of the elements `part` of the pack (whole segments), as its
        Optimizer2State.update_step makes it for one tensor."""
        group = pack.group
        beta1, beta2 = group["betas"]
        if pack.eight_bit:
            blocks = slice(None) if part == slice(None) else slice(part.start // BLOCK, part.stop // BLOCK)
            bnb.optimizer_update_8bit_blockwise(
                "adam", grad[part], pack.flat[part], pack.state1[part], pack.state2[part], beta1, beta2, 0.0,
                0.0, group["eps"], step, group["lr"], self._qmaps[0], self._qmaps[1], pack.absmax1[blocks],
                pack.absmax2[blocks], group["weight_decay"], gnorm_scale=1.0, skip_zeros=False)
        else:
            bnb.optimizer_update_32bit(
                "adam", grad[part], pack.flat[part], pack.state1[part], beta1, group["eps"], step, group["lr"],
                pack.state2[part], beta2, 0.0, 0.0, group["weight_decay"], 1.0, None, max_unorm=0.0,
                skip_zeros=False)

    # -- state as bitsandbytes writes it -------------------------------------------------------

    def _indexed(self) -> list[tuple[int, _Pack, int]]:
        """(index in the state_dict, pack, index in the pack) of every parameter."""
        where = {id(p): (pack, i) for pack in self._packs for i, p in enumerate(pack.params)}
        params = [p for group in self.param_groups for p in group["params"]]
        return [(index, *where[id(p)]) for index, p in enumerate(params)]

    def state_dict(self) -> dict:
        state = {}
        for index, pack, i in self._indexed():
            if pack.steps[i] == 0:
                continue  # bitsandbytes has no state for a parameter it never updated
            tensors = {"state1": _segments(pack.state1, pack, i, shaped=True),
                       "state2": _segments(pack.state2, pack, i, shaped=True)}
            if pack.eight_bit:
                first = pack.offsets[i] // BLOCK
                blocks = slice(first, first + math.ceil(pack.params[i].numel() / BLOCK))
                tensors.update(qmap1=self._qmaps[0], qmap2=self._qmaps[1], absmax1=pack.absmax1[blocks],
                               absmax2=pack.absmax2[blocks])
            state[index] = {"step": pack.steps[i], QUANT_STATE: {k: v.clone() for k, v in tensors.items()}}
        groups, first = [], 0
        for group in self.param_groups:
            count = len(group["params"])
            groups.append({**{k: v for k, v in group.items() if k != "params"},
                           "params": list(range(first, first + count))})
            first += count
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict) -> None:
        """Loads a state_dict of this optimizer or of bitsandbytes' AdamW8bit over the same parameters."""
        saved_sizes = [len(g["params"]) for g in state_dict["param_groups"]]
        sizes = [len(g["params"]) for g in self.param_groups]
        if saved_sizes != sizes:
            raise ValueError(f"the saved optimizer state holds parameter groups of {saved_sizes} tensors, this run's "
                             f"optimizer {sizes}: resume with the LoRA settings the checkpoint was trained with")
        checked = []
        for index, pack, i in self._indexed():
            saved = state_dict["state"].get(index)
            checked.append((pack, i, None if saved is None else {**saved, **saved.get(QUANT_STATE, {})}))
        for pack, i, saved in checked:
            if saved is not None:
                self._check_saved(pack, i, saved)
        with torch.no_grad():
            for pack, i, saved in checked:
                self._load_segment(pack, i, saved)
        for group, saved_group in zip(self.param_groups, state_dict["param_groups"], strict=True):
            group.update({k: v for k, v in saved_group.items() if k != "params"})

    def _check_saved(self, pack: _Pack, i: int, saved: dict) -> None:
        param = pack.params[i]
        expected = torch.uint8 if pack.eight_bit else torch.float32
        state1 = saved.get("state1")
        if state1 is None or "state2" not in saved:
            raise ValueError("the saved optimizer state was not written by adamw8bit (it lacks bitsandbytes' "
                             "state1/state2): resume with the optimizer the checkpoint was trained with")
        if state1.dtype != expected or state1.shape != param.shape:
            raise ValueError(f"the saved optimizer state of a LoRA tensor of shape {tuple(param.shape)} is "
                             f"{state1.dtype} of shape {tuple(state1.shape)}, this optimizer keeps {expected}: "
                             "resume with the optimizer and LoRA settings the checkpoint was trained with")
        if pack.eight_bit and saved["absmax1"].numel() != math.ceil(param.numel() / BLOCK):
            raise ValueError(f"the saved 8-bit optimizer state was quantised in blocks of other than {BLOCK} "
                             "elements (bitsandbytes older than 0.44): resume with bitsandbytes >= 0.44 from a "
                             "checkpoint it wrote, or start the run anew")

    def _load_segment(self, pack: _Pack, i: int, saved: dict | None) -> None:
        for name in ("state1", "state2"):
            segment = _segments(getattr(pack, name), pack, i, shaped=False)
            segment.zero_()
            if saved is not None:
                segment[:pack.params[i].numel()].copy_(saved[name].flatten())
        if pack.eight_bit:
            first, count = pack.offsets[i] // BLOCK, pack.sizes[i] // BLOCK
            for name in ("absmax1", "absmax2"):
                blocks = getattr(pack, name)[first:first + count]
                blocks.zero_()
                if saved is not None:
                    blocks[:saved[name].numel()].copy_(saved[name])
        pack.steps[i] = 0 if saved is None else int(saved["step"])
