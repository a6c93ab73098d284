"""LoRA+ (Hayou et al., 2024; kohya's `loraplus_lr_ratio`): the up (B) matrices of a LoRA learn at a
multiple of the learning rate of the down (A) matrices, which the paper finds trains faster at equal cost.

The optimizer gets two parameter groups, the input side and the output side of every adapter, each
carrying its multiple as `lr_ratio`; the trainer sets each group's learning rate to the schedule's
value times that multiple at every step. Any torch optimizer takes parameter groups (the fused 8-bit
one packs each group apart), and the groups with their `lr_ratio` are part of the optimizer's state_dict,
so a resumed run continues with them. A layer names its output side through `LoraLayer.up_parameters()`.
"""

from .lora import LoraNetwork

# The parameter-group key holding a group's multiple of the scheduled learning rate.
LR_RATIO = "lr_ratio"


def parameter_groups(network: LoraNetwork, up_lr_ratio: float) -> list[dict]:
    """The optimizer's parameter groups: every parameter in one group when `up_lr_ratio` is 1 (LoRA+
    off, the layout of runs before LoRA+), else the input side (ratio 1) and the output side
    (`up_lr_ratio`), each in the network's parameter order."""
    params = list(network.parameters())
    if up_lr_ratio == 1.0:
        return [{"params": params, LR_RATIO: 1.0}]
    up = {id(p) for _, layer in network.items() for p in layer.up_parameters()}
    down_side = [p for p in params if id(p) not in up]
    up_side = [p for p in params if id(p) in up]
    if not down_side or not up_side:
        raise ValueError("train.loraplus_lr_ratio: the LoRA's layers name no up/down split of their parameters; "
                         "set loraplus_lr_ratio to 1")
    return [{"params": down_side, LR_RATIO: 1.0}, {"params": up_side, LR_RATIO: float(up_lr_ratio)}]
