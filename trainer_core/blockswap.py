"""Block swap: frozen base blocks kept in host memory and copied to the training device just ahead of use.

A model whose weights do not fit the card beside a step's activations trains with some of its blocks
(Flux's double and single blocks, SD3's joint blocks, SDXL's ResBlocks and transformer blocks) stored
off the card. Each swapped block comes to the card only for its computation: in the forward, in its
checkpoint's recompute during backward, and in previews. Its copy starts on a side CUDA stream when the
block before it (in the direction the model runs: forward, or backward for recomputes) starts, so the
copy overlaps that block's compute, and it is let go as soon as the block returns.

The copies land in a few fixed device buffers (RESIDENT_WINDOW of them, each as large as the largest
swapped block), used in turn: the block computing, the one visited before it (whose backward may still
run), and the next one arriving. Nothing is allocated per visit and the host never waits: the side
stream waits for the compute stream to have begun the visit after a buffer's previous block (an event
recorded there), and the compute stream for the copy's arrival. Both waits are stream-ordered, so a
step with swapped blocks can be recorded as a CUDA graph (graphs.py) like any other: the recording
holds the copies from the pinned host memory (which never moves) into the buffers (which never move),
and the kernels that read each block's weights where its copy lands.

Residency is per tensor slot: while a block is away, each of its parameters and buffers is a placeholder
on the meta device (anything that uses it by mistake fails loudly); while it computes, the slot holds a
tensor on the memory of the buffer its copy is in. The checkpoint's recompute saves the weights it used for
the block's backward: those tensors, whose memory is not written again until the block's backward is done.

ComfyUI's model management never sees a swapped block: for the run each one is replaced in its parent
by a stand-in without parameters that calls it. ComfyUI's loader moves the rest of the model to the card
(fully), and its partial unloads and reloads around previews leave the swapped blocks alone. At the end
the blocks and their own tensors are put back and ComfyUI unloads the model, so the next generation
loads it as it would have before the run.

Swapping needs per-block checkpointing: without it autograd would keep every block's weights for the
backward, on the card, which is what swapping avoids.
"""

import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

log = logging.getLogger(__name__)

# Device buffers swapped blocks are copied into, used in turn: the block computing, the one visited before
# it (the device may still run it, or its backward, while the host has gone on), and the next one arriving.
RESIDENT_WINDOW = 3
# Where each tensor of a block starts in its buffer, in bytes: aligned as the caching allocator aligns, so a
# tensor there is as aligned as one allocated on its own (compiled kernels assume 16-byte aligned inputs).
ALIGNMENT = 512
# Bytes per LoRA parameter beside the fp32 weight and its fp32 gradient, by optimizer: AdamW's two fp32
# moments, AdamW8bit's two 8-bit ones, Adafactor's factored second moment (at most one fp32 per
# element), Prodigy's four fp32 states.
OPTIMIZER_STATE_BYTES = {"adamw": 8, "adamw8bit": 2, "adafactor": 4, "prodigy": 16}
# Activation memory of a step, in hidden states (batch x tokens x width in the compute dtype): each
# checkpointed block keeps its input (one hidden state), and one block at a time holds its recomputed
# activations and their gradients (attention, the MLP's 4x expansion, norms: about 24 of the largest).
SAVED_PER_BLOCK = 1
WORKING_HIDDEN_STATES = 24
# What the estimate leaves unplanned: the allocator's fragmentation, kernel workspaces, the noise and
# batch tensors. A fixed part and a share of the card.
MARGIN_BYTES = 512 << 20
MARGIN_SHARE = 0.05


def swapped_indices(block_count: int, swap_count: int) -> list[int]:
    """Which of `block_count` blocks (in the order they run) are swapped: `swap_count` spread evenly,
    so that each copy has the compute of the unswapped blocks before it to hide behind. The first
    block always stays on the card (its start begins the first copy), the last one unless all but the
    first are swapped (its recompute begins the first copy of the backward)."""
    if swap_count >= block_count:
        return list(range(block_count))
    return [(k + 1) * block_count // (swap_count + 1) for k in range(swap_count)]


def tensor_bytes(module: nn.Module) -> int:
    """Bytes of a module's parameters and buffers as stored (fp8 weights: one byte each)."""
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


@dataclass(frozen=True)
class MemoryEstimate:
    """What a step needs on the training device, apart from the blocks (bytes)."""

    rest_of_model: int  # parameters and buffers outside the blocks
    lora: int  # LoRA weights, gradients and optimizer state
    activations: int
    available: int  # the device's free memory for the run

    @property
    def fixed(self) -> int:
        return self.rest_of_model + self.lora + self.activations

    @property
    def margin(self) -> int:
        return MARGIN_BYTES + int(MARGIN_SHARE * self.available)


def bytes_on_device(block_bytes: Sequence[int], swap_count: int, estimate: MemoryEstimate) -> int:
    """Peak memory of a step with `swap_count` blocks swapped: what stays, the resident blocks, and the
    buffers the swapped blocks visit in (each as large as the largest swapped block)."""
    swapped = swapped_indices(len(block_bytes), swap_count)
    staying = sum(b for i, b in enumerate(block_bytes) if i not in swapped)
    visiting = min(RESIDENT_WINDOW, len(swapped)) * max((block_bytes[i] for i in swapped), default=0)
    return estimate.fixed + staying + visiting


def fewest_blocks_that_fit(block_bytes: Sequence[int], estimate: MemoryEstimate) -> int:
    """The smallest number of blocks to swap for the step to fit `estimate.available` less the margin (0 where
    the whole model does); all of them when nothing fits (the run then tries with every block swapped).
    The margin holds for the unswapped model too: Flux fp8 on a 16 GB card, estimated at 14.3 of 14.6 GiB
    free, trained at its limit (no room for CUDA graphs, the allocator freeing and re-reserving) at 0.72 s a
    step, slower than with 30 blocks swapped on a 12 GB card (0.58 s)."""
    return next((count for count in range(len(block_bytes) + 1) if fits(block_bytes, count, estimate)),
                len(block_bytes))


def fits(block_bytes: Sequence[int], swap_count: int, estimate: MemoryEstimate) -> bool:
    return bytes_on_device(block_bytes, swap_count, estimate) + estimate.margin <= estimate.available


def chosen_swap_count(block_bytes: Sequence[int], estimate: MemoryEstimate, batch: str) -> int:
    """`fewest_blocks_that_fit`, with the sums behind it in the log (`batch`: what the activations are for)."""
    count = fewest_blocks_that_fit(block_bytes, estimate)
    gib = 2**30
    needed = bytes_on_device(block_bytes, count, estimate) + estimate.margin
    log.info("block swap (auto): %d of %d blocks; a step needs about %.2f GiB of the %.2f GiB free (rest of the "
             "model %.2f, LoRA and optimizer %.2f, activations at %s %.2f, margin %.2f, blocks on the card %.2f)",
             count, len(block_bytes), needed / gib, estimate.available / gib, estimate.rest_of_model / gib,
             estimate.lora / gib, batch, estimate.activations / gib, estimate.margin / gib,
             (needed - estimate.fixed - estimate.margin) / gib)
    if needed > estimate.available:
        log.warning("block swap (auto): even with every block swapped the estimate exceeds the free memory; the run "
                    "tries anyway")
    return count


def chosen_swap_plan(block_bytes: Sequence[int], graphed: MemoryEstimate | None, eager: MemoryEstimate,
                     batch: str, graphs_swap: bool = True) -> tuple[int, bool]:
    """How many blocks to swap, and whether steps record as CUDA graphs: by the `graphed` estimate (None: the
    run does not record them) where its step fits with at most every block swapped (with none, where
    `graphs_swap` is False: swapped steps are not recorded under cudaMallocAsync, graphs.py); else by the
    `eager` one, with graphs off. A card too small for a recorded step's pool beside the model's least trains as
    it can eagerly (Flux fp8 on 8 GB: 6.5 GiB free, 5.9 GiB estimated for the graphed step without any block)."""
    most_swapped = len(block_bytes) if graphs_swap else 0
    if graphed is not None and fits(block_bytes, most_swapped, graphed):
        return chosen_swap_count(block_bytes, graphed, batch), True
    if graphed is not None:
        log.info("block swap (auto): a step recorded as a CUDA graph does not fit %s; steps run eagerly",
                 "even with every block swapped" if graphs_swap else "with every block on the card (under "
                 "cudaMallocAsync only such a step is recorded)")
    return chosen_swap_count(block_bytes, eager, batch), False


def activation_bytes(hidden_states: Sequence[int], compute_bytes: int, largest_block_parameters: int,
                     weights_cast: bool) -> int:
    """Estimated activation memory of one checkpointed training step, from the elements of each block's
    input (`block_hidden_states`; see SAVED_PER_BLOCK). Weights stored in another dtype than the compute
    one (fp8) are cast layer by layer, and a block's backward keeps its cast weights: one block's
    parameters in the compute dtype on top."""
    cast = largest_block_parameters * compute_bytes if weights_cast else 0
    return (SAVED_PER_BLOCK * sum(hidden_states) + WORKING_HIDDEN_STATES * max(hidden_states)) * compute_bytes + cast


def block_width(block: nn.Module) -> int:
    """The width of the hidden state a block works on: its first convolution's input channels (a UNet's
    ResBlock, whose first linear layer takes the timestep embedding), else its first linear layer's input
    features."""
    for kind in (nn.Conv2d, nn.Linear):
        layer = next((m for m in block.modules() if isinstance(m, kind)), None)
        if layer is not None:
            return layer.in_channels if kind is nn.Conv2d else layer.in_features
    return 0


def block_hidden_states(widths: Sequence[int], batch: int, image_tokens: int, text_tokens: int) -> list[int]:
    """Elements of each block's input at a batch of `image_tokens` latent positions (patches). A DiT's blocks
    all work on the full sequence, text tokens included (`text_tokens`; 0 for a UNet, whose text enters by
    cross-attention); a UNet halves the side and doubles the width at each level, so a block
    `width / narrowest` times wider than the narrowest sees that factor squared fewer positions (SDXL: 128²
    at 320 channels, 64² at 640, 32² at 1280)."""
    narrowest = min(widths)
    return [batch * (image_tokens * narrowest**2 // width**2 + text_tokens) * width for width in widths]


# CUDA graphs (graphs.py): their shared pool keeps a recorded step's activations and, recording another bucket's
# shape into it, grows past them; Flux fp8 and SD3.5 Large ran out of memory recording the second bucket at the
# eager estimate.
GRAPH_POOL_ACTIVATIONS = 1
# cudaMallocAsync (a ComfyUI server's allocator): its pool keeps what each bucket's step freed in the sizes it was
# carved, and PyTorch's backend does not give it back and retry when the card is full. Beyond the live peak it held
# 0.6-2.0x the eager activations in the node's runs (SDXL 8 GB 2.0x, SD3.5 Medium 8 GB 1.8x, SD3.5 Large fp8
# 12 GB 1.7x); SD3.5 Large ran out of memory in its first step with one set counted (and the margin).
ASYNC_POOL_ACTIVATIONS = 2


def estimate_step(diffusion_model: nn.Module, blocks: Sequence[nn.Module], lora_parameters: int, optimizer: str,
                  batch_shape: Sequence[int], text_tokens: int, compute_dtype: torch.dtype,
                  available: int, pooled_activations: int = 0) -> MemoryEstimate:
    """The memory a training step needs besides the blocks, at the run's largest batch (B, C, H, W):
    image tokens are the latent's patches (the DiTs' `patch_size`, whose sequences hold the text too; a
    UNet (SDXL) has none and works on every latent pixel at its first level).

    `pooled_activations`: how many more times a step's activations a memory pool holds beside the live ones
    (GRAPH_POOL_ACTIVATIONS, ASYNC_POOL_ACTIVATIONS; bench/NOTES.md §13, §15, §16; on an H200 with the card's
    end physical)."""
    batch, _, height, width = batch_shape
    patch = getattr(diffusion_model, "patch_size", None)
    compute_bytes = torch.empty((), dtype=compute_dtype).element_size()
    stored = {t.dtype for b in blocks for t in b.parameters()}
    hidden_states = block_hidden_states([block_width(b) for b in blocks], batch,
                                        (height // (patch or 1)) * (width // (patch or 1)),
                                        text_tokens if patch else 0)
    activations = activation_bytes(hidden_states, compute_bytes,
                                   max(sum(p.numel() for p in b.parameters()) for b in blocks),
                                   stored != {compute_dtype})
    activations *= 1 + pooled_activations
    lora = lora_parameters * (4 + 4 + OPTIMIZER_STATE_BYTES[optimizer])
    rest = tensor_bytes(diffusion_model) - sum(map(tensor_bytes, blocks))
    return MemoryEstimate(rest_of_model=rest, lora=lora, activations=activations, available=available)


class _StandIn(nn.Module):
    """Takes a swapped block's place in its parent for the run: no parameters of its own for ComfyUI's
    loader to move, and every call and attribute read passed to the block. Made by `_stand_in_for`."""

    def forward(self, *args, **kwargs):
        return self.__dict__["swapped_block"](*args, **kwargs)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["swapped_block"], name)


_STAND_IN_CLASSES: dict[type, type] = {}


def _stand_in_for(block: nn.Module) -> _StandIn:
    """A stand-in that is also an instance of the block's class: parents dispatch on it (SDXL's
    TimestepEmbedSequential passes the timestep embedding only to `TimestepBlock`s)."""
    kind = type(block)
    if kind not in _STAND_IN_CLASSES:
        _STAND_IN_CLASSES[kind] = type(f"SwappedOut{kind.__name__}", (_StandIn, kind), {})
    stand_in = nn.Module.__new__(_STAND_IN_CLASSES[kind])
    # The block's class is not initialised: the stand-in has no state but the block it calls.
    nn.Module.__init__(stand_in)
    # In __dict__, not _modules: the block must not be part of the module tree.
    stand_in.__dict__["swapped_block"] = block
    return stand_in


class _Slot:
    """One parameter or buffer of a swapped block: where it lives in its module, its own tensor (put
    back at the end), the stored copy that visits are made from, where it goes in a visit buffer
    (`offset`, bytes), and the placeholder for while away."""

    def __init__(self, owner: nn.Module, name: str, is_parameter: bool, original: torch.Tensor, stored: torch.Tensor,
                 offset: int):
        self.owner, self.name, self.is_parameter = owner, name, is_parameter
        self.original = original
        self.stored = stored
        self.offset = offset
        self.away = self._wrap(torch.empty_like(stored, device="meta"))

    @property
    def nbytes(self) -> int:
        return self.stored.numel() * self.stored.element_size()

    def _wrap(self, tensor: torch.Tensor) -> torch.Tensor:
        return nn.Parameter(tensor, requires_grad=False) if self.is_parameter else tensor

    def place_in(self, memory: torch.Tensor) -> torch.Tensor:
        """This tensor's place in a visit buffer (bytes): a tensor of its dtype and shape on that memory, not
        a view of the buffer (compiled blocks and autograd see a tensor of its own), wrapped as the module
        holds it."""
        place = torch.empty(0, dtype=self.stored.dtype, device=memory.device)
        place.set_(memory.untyped_storage(), self.offset // self.stored.element_size(), self.stored.shape,
                   self.stored.stride())
        return self._wrap(place)

    def put(self, tensor: torch.Tensor) -> None:
        table = self.owner._parameters if self.is_parameter else self.owner._buffers
        table[self.name] = tensor

    def leave(self) -> None:
        self.put(self.away)


# (block, tensor's dotted name inside it, the tensor) -> the value to train with instead, or None for its own.
Replacement = Callable[[nn.Module, str, torch.Tensor], torch.Tensor | None]


def _slots_of(block: nn.Module, store: Callable[[torch.Tensor], torch.Tensor], replaced: Replacement) -> list[_Slot]:
    slots, end = [], 0
    for path, owner in block.named_modules():
        for table, is_parameter in ((owner._parameters, True), (owner._buffers, False)):
            for name, tensor in table.items():
                if tensor is not None:
                    value = replaced(block, f"{path}.{name}" if path else name, tensor)
                    stored = store((tensor.data if value is None else value).contiguous())
                    slots.append(_Slot(owner, name, is_parameter, tensor, stored, end))
                    end += -(-slots[-1].nbytes // ALIGNMENT) * ALIGNMENT
    return slots


def _store_for(device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    """How a block's tensors are kept while away: in pinned host memory for a CUDA device (copies from
    it can run asynchronously, and be recorded in a CUDA graph), else the tensor as it is (the CPU tests,
    where both devices are the CPU)."""
    if device.type == "cuda":
        return lambda tensor: tensor.to("cpu").pin_memory()
    return lambda tensor: tensor


class _VisitBuffer:
    """A device buffer swapped blocks are copied into. `free_after` is what the compute stream reaches once
    the block last copied here is done with it (the next visit's arrival; None: nothing is pending, or
    what was is before the current model call began). `used` orders the buffers by their last use."""

    def __init__(self, memory: torch.Tensor):
        self.memory = memory
        self.free_after = None
        self.used = 0


class BlockSwapper:
    """Swaps `blocks[i]` for each i in `swapped` between a stored copy and `device`, around each call.

    `blocks` are all the model's checkpointed blocks in the order they run: each one's start triggers
    the copy of the next swapped block in the direction the model runs, and the first one's start in the
    forward begins a model call (a training step, or a preview's sampling step). `wrap(block, forward)`
    gives the forward that does this; checkpointing.wrapped_blocks places it inside each block's
    checkpoint, so recomputes in backward are covered too.
    """

    def __init__(self, blocks: Sequence[nn.Module], swapped: Sequence[int], device: torch.device):
        self.blocks = list(blocks)
        self.swapped = sorted(swapped)
        self.device = device
        self._index = {id(block): i for i, block in enumerate(self.blocks)}
        self._slots: dict[int, list[_Slot]] = {}
        self._buffers: list[_VisitBuffer] = []
        # Each block's tensors placed in each buffer, made once: (buffer number, block index) -> tensors.
        self._places: dict[tuple[int, int], list[torch.Tensor]] = {}
        # Swapped blocks on the device or on their way: index -> (buffer number, event the copy records).
        self._present: dict[int, tuple[int, torch.cuda.Event | None]] = {}
        self._copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        # Visits so far, and the buffer of the latest one (its block may still compute).
        self._visits = 0
        self._latest: _VisitBuffer | None = None
        self._stand_ins: list[tuple[nn.Module, str, nn.Module]] = []

    @property
    def swapped_bytes(self) -> int:
        return sum(tensor_bytes(self.blocks[i]) for i in self.swapped)

    @contextlib.contextmanager
    def installed(self, model: nn.Module, replaced: Replacement = lambda block, name, tensor: None):
        """Stores the swapped blocks away and hides them from `model`'s module tree for the duration;
        puts back every block, tensor and module exactly as they were on exit, also on error.
        `replaced` gives a value to train with in place of a tensor's own (a weight with the patches of
        a LoRA loaded before training); the tensor itself is put back afterwards."""
        parents = {id(child): (parent, name) for parent in model.modules() for name, child in parent._modules.items()
                   if child is not None}
        store = _store_for(self.device)
        try:
            for index in self.swapped:
                block = self.blocks[index]
                slots = _slots_of(block, store, replaced)
                self._slots[index] = slots
                for slot in slots:
                    slot.leave()
                parent, name = parents[id(block)]
                parent._modules[name] = _stand_in_for(block)
                self._stand_ins.append((parent, name, block))
            size = max((s.offset + s.nbytes for slots in self._slots.values() for s in slots), default=0)
            self._buffers = [_VisitBuffer(torch.empty(size, dtype=torch.uint8, device=self.device))
                             for _ in range(min(RESIDENT_WINDOW, len(self.swapped)))]
            yield self
        finally:
            self._synchronize()
            self._present.clear()
            self._places.clear()
            self._buffers.clear()
            self._latest = None
            for parent, name, block in reversed(self._stand_ins):
                parent._modules[name] = block
            self._stand_ins.clear()
            for slots in self._slots.values():
                for slot in slots:
                    slot.put(slot.original)
            self._slots.clear()

    def wrap(self, block: nn.Module, forward: Callable) -> Callable:
        index = self._index[id(block)]

        def swapping_forward(*args, **kwargs):
            backward = torch._C._current_graph_task_id() != -1
            if index == 0 and not backward:
                self._begin_call()
            if index in self._slots:
                self._arrive(index)
            self._prefetch_after(index, -1 if backward else 1)
            try:
                return forward(*args, **kwargs)
            finally:
                if index in self._slots:
                    self._leave(index)

        return swapping_forward

    # -- moving blocks -------------------------------------------------------------------------------

    def _begin_call(self) -> None:
        """A model call begins: all work queued before it comes first on the compute stream, so no buffer
        waits for an earlier visit; events of an earlier call may belong to a CUDA graph's recording,
        which no later work can wait on. Copies left from an unfinished call are forgotten (the side
        stream runs in order: a later copy into their buffer comes after them)."""
        for buffer in self._buffers:
            buffer.free_after = None
        self._latest = None
        self._present.clear()

    def _prefetch_after(self, index: int, direction: int) -> None:
        """Starts the copy of the next swapped block after `index` in `direction`, and drops a copy made
        ahead for another block (the model ran in another order than expected)."""
        ahead = [i for i in self.swapped if (i - index) * direction > 0]
        following = min(ahead, key=lambda i: abs(i - index)) if ahead else None
        for other in [i for i in self._present if i not in (index, following)]:
            self._drop(other)
        if following is not None and following not in self._present:
            self._present[following] = self._copy(following)

    def _free_buffer(self) -> int:
        """The least recently used buffer that holds no block on the device or on its way there."""
        taken = {number for number, _ in self._present.values()}
        free = [n for n in range(len(self._buffers)) if n not in taken]
        return min(free, key=lambda n: self._buffers[n].used)

    def _copy(self, index: int) -> tuple[int, torch.cuda.Event | None]:
        number = self._free_buffer()
        buffer = self._buffers[number]
        # The buffer's previous block is done once the compute stream reaches the visit after it; where
        # none is pending, once it reaches what the host has queued so far.
        ready = buffer.free_after if buffer.free_after is not None else self._mark_compute()
        buffer.free_after = None
        self._visits += 1
        buffer.used = self._visits
        return number, self._copy_into(self._places_of(number, index), self._slots[index], ready)

    def _places_of(self, number: int, index: int) -> list[torch.Tensor]:
        key = (number, index)
        if key not in self._places:
            with torch.no_grad():
                self._places[key] = [slot.place_in(self._buffers[number].memory) for slot in self._slots[index]]
        return self._places[key]

    def _copy_into(self, places: list[torch.Tensor], slots: list[_Slot], ready) -> torch.cuda.Event | None:
        with torch.no_grad():
            if self._copy_stream is None:
                for place, slot in zip(places, slots, strict=True):
                    place.copy_(slot.stored)
                return None
            with torch.cuda.stream(self._copy_stream):
                self._copy_stream.wait_event(ready)
                for place, slot in zip(places, slots, strict=True):
                    place.copy_(slot.stored, non_blocking=True)
                event = torch.cuda.Event()
                event.record(self._copy_stream)
        return event

    def _arrive(self, index: int) -> None:
        if index not in self._present:
            self._present[index] = self._copy(index)
        number, event = self._present[index]
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)
        # The compute stream reaches this when the arriving block begins: the visit before is done.
        arrival = self._mark_compute()
        if self._latest is not None:
            self._latest.free_after = arrival
        self._latest = self._buffers[number]
        for slot, place in zip(self._slots[index], self._places_of(number, index), strict=True):
            slot.put(place)

    def _mark_compute(self):
        """An event the compute stream reaches once what the host has queued on it so far is done (None off CUDA)."""
        if self._copy_stream is None:
            return None
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        return event

    def _leave(self, index: int) -> None:
        del self._present[index]
        for slot in self._slots[index]:
            slot.leave()

    def join(self) -> None:
        """Lets every copy made ahead go unused (a step failed halfway: inside a CUDA graph's recording, the
        recording can only end, and its error be seen, once the side stream's work is joined)."""
        for index in list(self._present):
            self._drop(index)

    def _drop(self, index: int) -> None:
        """Lets a copy made ahead go unused. The compute stream still waits for it: inside a CUDA graph's
        recording, work on the side stream must join the recorded stream again."""
        _, event = self._present.pop(index)
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)

    def _synchronize(self) -> None:
        if self._copy_stream is not None:
            self._copy_stream.synchronize()
