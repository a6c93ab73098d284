"""The one training loop, for every family.

Reads top to bottom: data order, schedule, optimizer, the Trainer (setup, loss, step, run).
A run leaves ComfyUI's inference mode, installs the LoRA and the per-block checkpoints on the
model's modules, and removes every one of them when it ends, also on error.
"""

import contextlib
import importlib.util
import logging
import math
import sys
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import comfy.model_management
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend

from . import comfy_compat
from .attention import kernel_order, kernels_in_order
from .blockswap import (
    ASYNC_POOL_ACTIVATIONS,
    GRAPH_POOL_ACTIVATIONS,
    BlockSwapper,
    chosen_swap_plan,
    estimate_step,
    swapped_indices,
    tensor_bytes,
)
from .checkpointing import make_autograd_safe, wrapped_blocks
from .comfy_compat import device_memory_available
from .config import BLOCKS_TO_SWAP_AUTO, ConfigError, LoraConfig, TrainConfig
from .ema import LoraEma
from .families import family_for
from .graphs import GraphedSteps, under_cuda_malloc_async
from .lora import LoraNetwork
from .loraplus import LR_RATIO, parameter_groups
from .objective import masked, preservation_loss, split_terms
from .text_encoders import SIZE, CaptionEncoding

log = logging.getLogger(__name__)


@dataclass
class Sample:
    """One training example: VAE latents (C, H, W) in the model's latent space, and the
    family's conditioning tensors for it (see Family.conditioning), with the loss terms of
    objective.py (mask, loss weight, preservation) where its dataset has them."""

    latents: torch.Tensor
    conditioning: dict[str, torch.Tensor]
    key: str = ""
    # Other conditionings of the same image (shuffled tags, the empty caption of caption
    # dropout), each with its probability of being drawn instead of `conditioning`.
    alternatives: list[tuple[float, dict[str, torch.Tensor]]] = field(default_factory=list)

    def draw_conditioning(self, generator: torch.Generator) -> dict[str, torch.Tensor]:
        if not self.alternatives:
            return self.conditioning
        u = float(torch.rand((), generator=generator))
        for probability, conditioning in self.alternatives:
            if u < probability:
                return conditioning
            u -= probability
        return self.conditioning


class BatchOrder:
    """A seeded, resumable order of batches: each epoch is a permutation of the samples, cut
    into batches of samples with equal latent shape (aspect-ratio buckets). The sample
    sequence does not depend on the batch size when every sample has the same shape."""

    def __init__(self, shapes: Sequence[tuple[int, ...]], batch_size: int, seed: int):
        self.shapes = list(shapes)
        self.batch_size = batch_size
        self.seed = seed

    def epoch(self, epoch: int) -> list[list[int]]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        permutation = torch.randperm(len(self.shapes), generator=generator).tolist()
        open_batches: dict[tuple[int, ...], list[int]] = {}
        batches = []
        for index in permutation:
            bucket = open_batches.setdefault(self.shapes[index], [])
            bucket.append(index)
            if len(bucket) == self.batch_size:
                batches.append(open_batches.pop(self.shapes[index]))
        batches.extend(open_batches.values())
        return batches

    def batch_shapes(self) -> set[tuple[int, ...]]:
        """Every (batch size, *latent shape) an epoch's batches have: per bucket, full batches and
        the smaller last one of a bucket whose count the batch size does not divide."""
        counts: dict[tuple[int, ...], int] = {}
        for shape in self.shapes:
            counts[shape] = counts.get(shape, 0) + 1
        sizes = {(shape, size) for shape, count in counts.items()
                 for size in (min(count, self.batch_size), count % self.batch_size) if size}
        return {(size, *shape) for shape, size in sizes}


def lr_factor(step: int, schedule: str, warmup_steps: int, total_steps: int) -> float:
    """Multiplier of the base learning rate at optimizer step `step` (0-based)."""
    if schedule == "constant":
        return 1.0
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if schedule == "constant_with_warmup":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0 - progress  # linear


def build_optimizer(params: list, config: TrainConfig) -> torch.optim.Optimizer:
    """`params`: parameters, or parameter groups (dicts with "params" and their own "lr"; see loraplus.py)."""
    lr, decay = config.learning_rate, config.weight_decay
    if config.optimizer == "adamw":
        tensors = [p for item in params for p in (item["params"] if isinstance(item, dict) else [item])]
        fused = all(p.is_cuda for p in tensors)
        return torch.optim.AdamW(params, lr=lr, weight_decay=decay, fused=fused or None)
    if config.optimizer == "adamw8bit":
        # bitsandbytes' AdamW8bit, one update for all LoRA tensors instead of one per tensor (optim.py).
        from .optim import FusedAdamW8bit

        return FusedAdamW8bit(params, lr=lr, weight_decay=decay)
    if config.optimizer == "adafactor":
        return torch.optim.Adafactor(params, lr=lr, weight_decay=decay)
    try:
        import prodigyopt
    except ImportError:
        raise ConfigError("train.optimizer: 'prodigy' needs the prodigyopt package (pip install prodigyopt)") from None
    return prodigyopt.Prodigy(params, lr=lr, weight_decay=decay)


@dataclass
class StepReport:
    step: int
    total_steps: int
    loss: float
    lr: float
    samples_seen: int


@dataclass
class DataPosition:
    epoch: int = 0
    batch: int = 0


@dataclass
class RunState:
    """Everything besides weights and optimizer state that a resumed run needs."""

    step: int = 0
    samples_seen: int = 0
    data: DataPosition = field(default_factory=DataPosition)


AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
ALLOCATOR_NOTICE = ("steps run without CUDA graphs: under ComfyUI's default allocator (cudaMallocAsync) only SDXL "
                    "steps whose blocks all fit on the card with room for the allocator's pool are recorded; start "
                    "ComfyUI with --disable-cuda-malloc for faster, recorded steps")


def _addresses_of(*modules: torch.nn.Module) -> Callable[[], tuple]:
    """Where the modules' parameters and buffers are in memory now: a recorded graph reads them there.
    Moving a module swaps its parameters' data and replaces its buffers, so both are read anew."""
    parameters = [p for m in modules for p in m.parameters()]
    buffer_slots = [(owner._buffers, name) for m in modules for owner in m.modules()
                    for name, buffer in owner._buffers.items() if buffer is not None]

    def addresses() -> tuple:
        return (*(p.data_ptr() for p in parameters), *(slots[name].data_ptr() for slots, name in buffer_slots))

    return addresses


class Trainer:
    # Whether a step's forward and backward can be recorded as a CUDA graph (see uses_cuda_graphs).
    records_graphs = True

    def __init__(
        self,
        patcher,
        samples: Sequence[Sample],
        lora: LoraConfig,
        config: TrainConfig,
        network: LoraNetwork | None = None,
        clip=None,
    ):
        if not samples:
            raise ConfigError("dataset: it holds no samples; add images to the dataset folder")
        self.patcher = comfy_compat.plain_patcher(patcher)
        if self.patcher is not patcher:
            log.info("the model came with ComfyUI's dynamic VRAM loading; training a plainly loaded copy of it")
        self.config = config
        self.lora_config = lora
        self.family = family_for(self.patcher.model, config)
        self.samples = list(samples)
        self.order = BatchOrder([tuple(s.latents.shape) for s in self.samples], config.batch_size, config.seed)
        # One generator on the training device for timesteps and noise (no host round trip per
        # step), drawn per sample so that batching does not change the draws; one on the CPU for
        # caption variants; dropout uses torch's global generators, seeded alongside.
        torch.manual_seed(config.seed)
        self.generator = torch.Generator(self.device).manual_seed(config.seed)
        self.caption_generator = torch.Generator().manual_seed(config.seed)
        # ComfyUI runs nodes under inference mode; parameters made there could not be trained.
        with torch.inference_mode(False):
            self.network = network or LoraNetwork.create(self.family.diffusion_model, self.family.layer_kind, lora)
            self.network.to(self.device)
            # Parameter groups: LoRA+ splits the diffusion model's LoRA in two (loraplus.py), and a trained
            # text encoder's LoRA (text_encoders.py) is one more, at its own learning rate; the schedule
            # scales them all.
            self.text_encoding = self._caption_encoding(clip)
            groups = parameter_groups(self.network, config.loraplus_lr_ratio)
            for group in groups:
                group["lr"] = config.learning_rate * group[LR_RATIO]
            if self.text_encoding is not None:
                groups.append({"params": list(self.text_encoding.loras.parameters()),
                               "lr": config.text_encoder_learning_rate})
            self.group_learning_rates = [group["lr"] for group in groups]
            self.optimizer = build_optimizer(groups, config)
            self.ema = LoraEma(self.network, config.ema_decay) if config.ema_decay else None
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=config.precision == "fp16")
        self.state = RunState()
        self._batches: list[list[int]] = []
        self._conditioning_keys = sorted(self.samples[0].conditioning)
        self._graphed: GraphedSteps | None = None
        self._swapper: BlockSwapper | None = None
        self._loading_state: dict = {}
        # How many blocks the session swaps (blockswap.py; decided when it starts where blocks_to_swap is auto),
        # and whether a recorded step's memory fits beside them (auto turns CUDA graphs off where it cannot):
        # None until a session has decided.
        self.blocks_swapped = 0
        self._graphs_fit: bool | None = None

    @property
    def device(self) -> torch.device:
        return self.patcher.load_device

    def _caption_encoding(self, clip) -> CaptionEncoding | None:
        if not self.lora_config.trained_text_encoders:
            return None
        if clip is None:
            raise ConfigError("lora.text_encoders: training the text encoders needs the CLIP: pass it to the Trainer")
        if any(SIZE not in s.conditioning for s in self.samples):
            raise ConfigError("lora.text_encoders: the samples hold cached embeddings; build them with "
                              "build_samples(..., train_text_encoders=True), which keeps the captions' tokens")
        encoding = CaptionEncoding(comfy_compat.plain_clip(clip), self.lora_config, self.family, self.device)
        encoding.prepare([c for s in self.samples for c in (s.conditioning, *(a for _, a in s.alternatives))])
        return encoding

    def lora_parameters(self) -> list[torch.nn.Parameter]:
        """Every trained tensor: the diffusion model's LoRA, then the text encoders' where they train."""
        extra = list(self.text_encoding.loras.parameters()) if self.text_encoding is not None else []
        return [*self.network.parameters(), *extra]

    # -- setup ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def session(self):
        """The model on the training device, gradients on, LoRA and checkpoints installed."""
        cfg = self.config
        compile_blocks = self.compiles_blocks
        blocks = self.family.checkpoint_blocks() if cfg.gradient_checkpointing or compile_blocks else []
        swapper = self._swapper = self._block_swapper(blocks)
        if self._graphs_fit is None:
            # No plan looked at the memory (blocks_to_swap set, no checkpoints): under cudaMallocAsync a recording
            # that fails ends the process (graphs.py), so there only a plan that found room records.
            self._graphs_fit = not under_cuda_malloc_async(self.device)
        if swapper is None:
            self._load_model()
        with torch.inference_mode(False), torch.enable_grad():
            diffusion_model = self.family.diffusion_model
            if swapper is None:
                make_autograd_safe(diffusion_model)
            # Only the LoRA learns: no base weight may collect a gradient. The flags are kept by where each
            # parameter lives, not by the tensor: with block swap the model loads (and make_autograd_safe
            # replaces its inference tensors) after this, and a list of the tensors themselves would keep
            # the replaced ones alive on the card, a second copy of every block that stays there.
            trainable = [(owner, name, p.requires_grad) for owner in diffusion_model.modules()
                         for name, p in owner._parameters.items() if p is not None]
            diffusion_model.requires_grad_(False)
            try:
                self._prepare_samples()
                with (
                    comfy_compat.training_mode(True),
                    kernels_in_order(self.attention_kernels),
                    comfy_compat.attention_kernel_priority(self.attention_kernels),
                    self.network.attached(diffusion_model),
                    self.text_encoding.attached() if self.text_encoding is not None else contextlib.nullcontext(),
                    self.family.training_patches(),
                    wrapped_blocks(blocks, cfg.gradient_checkpointing, self.family.blocks_mutate_inputs,
                                   compile_blocks, dynamic=self.input_shapes_vary,
                                   around=swapper.wrap if swapper else None,
                                   share_code=self.family.blocks_share_compiled_code),
                    self._swapping(swapper),
                ):
                    self.network.train()
                    if self.text_encoding is not None:
                        self.text_encoding.loras.train()
                    if self.uses_cuda_graphs:
                        self._graphed = GraphedSteps(list(self.network.parameters()), self._forward_backward,
                                                     _addresses_of(diffusion_model, self.network))
                    elif self.allocator_notice:
                        log.info("%s", self.allocator_notice)
                    yield self
            finally:
                if self._graphed is not None:
                    self._graphed.release()
                    self._graphed = None
                self._swapper = None
                self.network.eval()
                if self.text_encoding is not None:
                    self.text_encoding.loras.eval()
                for owner, name, requires_grad in trainable:
                    # A swapped block keeps its own parameters, inference tensors where ComfyUI loaded the
                    # model; such a tensor takes its flag back only in inference mode.
                    parameter = owner._parameters[name]
                    with torch.inference_mode(parameter.is_inference()):
                        parameter.requires_grad_(requires_grad)
                comfy.model_management.soft_empty_cache()

    def _load_model(self) -> None:
        with torch.inference_mode():
            # Weights moved here are inference tensors, which make_autograd_safe then copies;
            # moved outside inference mode they would lack autograd's version counter.
            comfy.model_management.load_models_gpu([self.patcher], force_full_load=True)
        self._loading_state = comfy_compat.loading_state(self.family.diffusion_model)

    def reload_model(self) -> None:
        """Loads the model fully again after something between steps (a preview's VAE) made ComfyUI
        unload part of it, as the steps found it: same device, same attributes on its modules (with
        block swap, the swapped blocks stay where they are: ComfyUI does not see them)."""
        comfy.model_management.load_models_gpu([self.patcher], force_full_load=True)
        comfy_compat.restore_loading_state(self.family.diffusion_model, self._loading_state)

    def _block_swapper(self, blocks: list[torch.nn.Module]) -> BlockSwapper | None:
        """The swapper of this run's `blocks_to_swap` (blockswap.py), or None where nothing is swapped.
        Where blocks are swapped the model leaves the card first, also where ComfyUI had loaded it
        partially: the swapped blocks are stored from host memory."""
        wanted = self.config.blocks_to_swap
        if wanted == 0:
            return None
        if wanted == BLOCKS_TO_SWAP_AUTO and not self.config.gradient_checkpointing:
            # Swapping needs per-block checkpoints; auto, the default, then keeps every block on the card.
            return None
        if wanted > len(blocks):
            raise ConfigError(f"train.blocks_to_swap: {wanted} is more than the {len(blocks)} blocks this model has; "
                              f"give at most {len(blocks)}, or -1 (auto)")
        count = self._auto_swap_count(blocks) if wanted == BLOCKS_TO_SWAP_AUTO else wanted
        self.blocks_swapped = count
        if count == 0:
            return None
        comfy_compat.unload_models([self.patcher])
        swapper = BlockSwapper(blocks, swapped_indices(len(blocks), count), self.device)
        log.info("block swap: %d of %d blocks (%.2f GiB) stay in host memory and visit %s one at a time",
                 count, len(blocks), swapper.swapped_bytes / 2**30, self.device)
        return swapper

    def _auto_swap_count(self, blocks: list[torch.nn.Module]) -> int:
        """The fewest blocks to swap for a step at the run's largest batch to fit the card's free memory
        without the model (less what ComfyUI keeps in reserve), from blockswap's estimate. What ComfyUI has
        of the model on the card counts as free: where nothing is swapped it stays there (no unload and
        reload for the common case), and where blocks are swapped the model leaves the card first."""
        batch_shape = max(self.order.batch_shapes(), key=math.prod)
        text_tokens = max((t.shape[0] for s in self.samples for c in (s.conditioning, *(a for _, a in s.alternatives))
                           for t in c.values() if t.ndim == 2), default=0)
        available = device_memory_available(self.device) + self.patcher.loaded_size()

        def estimate(pooled_activations: int):
            return estimate_step(self.family.diffusion_model, blocks, sum(p.numel() for p in self.network.parameters()),
                                 self.config.optimizer, batch_shape, text_tokens, self.family.compute_dtype(),
                                 available, pooled_activations)

        under_async = under_cuda_malloc_async(self.device)
        eager_pool = ASYNC_POOL_ACTIVATIONS if under_async else 0
        # Under cudaMallocAsync (graphs.py) only steps of blocks not compiled, every one on the card, of a family
        # measured to record there, are recorded, and a recorded step's memory comes on top of the pool's.
        recordable = self.may_record and not (under_async and (self.compiles_blocks
                                                               or not self.family.records_under_cuda_malloc_async))
        graphed = estimate(GRAPH_POOL_ACTIVATIONS + eager_pool) if recordable else None
        count, self._graphs_fit = chosen_swap_plan([tensor_bytes(b) for b in blocks], graphed, estimate(eager_pool),
                                                   f"batch {tuple(batch_shape)}", graphs_swap=not under_async)
        return count

    @contextlib.contextmanager
    def _swapping(self, swapper: BlockSwapper | None):
        """With a swapper: the swapped blocks away, the rest of the model loaded on the card; afterwards
        every block back and the model unloaded, so ComfyUI sees it whole (and loads it as usual)."""
        if swapper is None:
            yield
            return
        diffusion_model = self.family.diffusion_model
        # A LoRA loaded before training patches the weights ComfyUI loads; the swapped blocks' are patched here.
        names = {module: name for name, module in self.patcher.model.named_modules()}

        def patched(block, name, tensor):
            return comfy_compat.patched_weight(self.patcher, f"{names[block]}.{name}", tensor)

        try:
            with swapper.installed(diffusion_model, patched):
                self._load_model()
                make_autograd_safe(diffusion_model)
                yield
        finally:
            comfy_compat.unload_models([self.patcher])

    @property
    def allocator_notice(self) -> str:
        """What the run tells the user where the process's allocator kept its steps from being recorded as CUDA
        graphs ("" elsewhere, and before a session has decided): a ComfyUI server's cudaMallocAsync, under which
        only SDXL's steps of blocks not compiled, all on the card with room for the pool, are recorded (graphs.py).
        SDXL's eager steps through the node took 6-8x its recorded ones on the H200 (bench/NOTES.md §15), so the
        node's panel says it too."""
        if under_cuda_malloc_async(self.device) and self.may_record and self._graphs_fit is False:
            return ALLOCATOR_NOTICE
        return ""

    @property
    def compiles_blocks(self) -> bool:
        """Whether the run compiles its blocks: on a GPU, compiled blocks launch far fewer kernels
        (eager steps are bound by Python and launch overhead; see bench/NOTES.md). "auto" needs
        Triton, in which torch.compile writes its GPU kernels (ComfyUI hosts on Windows often lack
        it), and leaves the CPU eager: ComfyUI's CPU attention reads the free memory at every call,
        which compiled code takes as a constant, so nearly every call would compile anew; and
        families where compiling was not measured to pay (`Family.compile_pays`) stay eager."""
        if self.config.compile_blocks == "auto":
            return (self.device.type == "cuda" and self.family.compile_pays
                    and importlib.util.find_spec("triton") is not None)
        return self.config.compile_blocks == "on"

    @property
    def input_shapes_vary(self) -> bool:
        """Whether the model sees batches of more than one shape in this run (aspect-ratio buckets,
        a smaller last batch of a bucket, captions of other token lengths): compiled blocks are
        then compiled for any size, once, instead of again for each shape."""
        conditionings = [c for s in self.samples for c in (s.conditioning, *(a for _, a in s.alternatives))]
        token_shapes = {tuple(sorted((k, tuple(v.shape)) for k, v in c.items())) for c in conditionings}
        return len(self.order.batch_shapes()) > 1 or len(token_shapes) > 1

    @property
    def may_record(self) -> bool:
        """Whether the run's steps can be recorded as CUDA graphs (graphs.py), memory aside: on CUDA, unless a
        step has more than one backward (gradient accumulation), a gradient scaler (fp16) reads values on the
        host between them, a subclass says its backward cannot be recorded (`records_graphs`), or LoRA dropout
        draws masks that the checkpoints' recomputes must redraw alike (not verified in a recorded graph)."""
        cfg = self.config
        # Encoding captions reads tokens on the host in every step: no text-encoder training either.
        return (cfg.cuda_graphs == "auto" and self.device.type == "cuda" and cfg.gradient_accumulation == 1
                and not self.scaler.is_enabled() and self.records_graphs and self.lora_config.dropout == 0
                and self.text_encoding is None)

    @property
    def uses_cuda_graphs(self) -> bool:
        """Whether steps replay as CUDA graphs: where they may (`may_record`) and the session found room for a
        recorded step's memory (`blocks_to_swap` auto; without a plan, under PyTorch's own allocator only).
        Swapped blocks are recorded with their copies (blockswap.py), except under cudaMallocAsync, where compiled
        blocks and families not measured there (`Family.records_under_cuda_malloc_async`) are not recorded either
        (graphs.py)."""
        return self.may_record and bool(self._graphs_fit)

    @property
    def attention_kernels(self) -> list[SDPBackend]:
        """SDPA's kernels in the order the run tries them (TrainConfig.attention; see attention.py)."""
        return kernel_order(self.config.attention, self.device)

    def _prepare_samples(self) -> None:
        # Tensors made under inference mode cannot be saved for backward: copy them once. Samples
        # share tensors (repeats, flipped twins, caption variants): each is moved once.
        moved: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

        def ready(tensor: torch.Tensor) -> torch.Tensor:
            if id(tensor) not in moved:
                on_device = tensor.to(self.device)
                # The original stays in the table, so its id cannot be reused by another tensor.
                moved[id(tensor)] = (tensor, on_device.clone() if on_device.is_inference() else on_device)
            return moved[id(tensor)][1]

        def ready_all(conditioning: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            return {k: ready(v) for k, v in conditioning.items()}

        for sample in self.samples:
            sample.latents = ready(sample.latents)
            sample.conditioning = ready_all(sample.conditioning)
            sample.alternatives = [(p, ready_all(c)) for p, c in sample.alternatives]

    def release(self) -> None:
        """Gives the training memory back: the LoRA moves to the CPU, optimizer state is dropped."""
        self.network.to("cpu")
        if self.ema is not None:
            self.ema.to("cpu")
        if self.text_encoding is not None:
            self.text_encoding.loras.to("cpu")
        self.optimizer = None
        self.scaler = None
        comfy.model_management.soft_empty_cache()

    def resume_state(self) -> dict:
        """What a resumed run needs besides the LoRA weights: plain values and tensors only."""
        state = {**self._progress(), "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict()}
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        if self.text_encoding is not None:
            state["text_encoder_lora"] = self.text_encoding.loras.state_dict()
        return state

    def load_resume_state(self, state: dict) -> None:
        if self.text_encoding is not None:
            self.text_encoding.loras.load_state_dict(state["text_encoder_lora"])
        self._restore_progress(state)
        self.optimizer.load_state_dict(state["optimizer"])
        if state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])

    def _progress(self) -> dict:
        """Where the run is: step, data position and every random generator it draws from."""
        return {
            "step": self.state.step,
            "samples_seen": self.state.samples_seen,
            "data_epoch": self.state.data.epoch,
            "data_batch": self.state.data.batch,
            "generator": self.generator.get_state(),
            "caption_generator": self.caption_generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else [],
        }

    def _restore_progress(self, state: dict) -> None:
        position = DataPosition(state["data_epoch"], state["data_batch"])
        self.state = RunState(state["step"], state["samples_seen"], position)
        self._batches = []
        self.generator.set_state(state["generator"])
        self.caption_generator.set_state(state["caption_generator"])
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"]:
            torch.cuda.set_rng_state_all(state["cuda_rng"])

    # -- the objective -------------------------------------------------------------------

    def _autocast(self):
        dtype = AUTOCAST_DTYPES.get(self.config.precision)
        return torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None)

    def loss(self, latents, conditioning, noise, timesteps) -> torch.Tensor:
        """Mean loss of a batch at the given noise and timesteps (B, ...), with the mask, loss weight
        and preservation terms its conditioning carries (objective.py)."""
        conditioning, terms = split_terms(conditioning)
        noisy, target = self.family.noisy_input_and_target(latents, noise, timesteps)
        if self.text_encoding is not None:
            # In fp32 outside autocast, as ComfyUI runs its text encoders: the same conditioning as CLIPTextEncode.
            conditioning = self.text_encoding.conditioning(conditioning)
        with self._autocast():
            prediction = self.family.predict(noisy, timesteps, conditioning)
        prediction, target = prediction.float(), target.float()
        if self.config.loss == "huber":
            per_element = F.huber_loss(prediction, target, reduction="none", delta=self.config.huber_delta)
        else:
            per_element = F.mse_loss(prediction, target, reduction="none")
        per_sample = masked(per_element, terms.mask).flatten(1).mean(1)
        weight = self.family.loss_weight(timesteps)
        if weight is not None:
            per_sample = per_sample * weight.to(per_sample)
        if terms.weight is not None:
            per_sample = per_sample * terms.weight.to(per_sample)
        loss = per_sample.mean()
        if terms.preserve_conditioning is not None:
            # Differential output preservation: the base model's prediction (LoRA off) on the class-word
            # caption is the target of the LoRA's prediction on it, at the same noisy input and time.
            with torch.no_grad(), self.network.disabled(), self._autocast():
                prior = self.family.predict(noisy, timesteps, terms.preserve_conditioning)
            with self._autocast():
                preserved = self.family.predict(noisy, timesteps, terms.preserve_conditioning)
            loss = loss + preservation_loss(preserved, prior, terms.preserve_weight)
        return loss

    def draw_noise_and_timesteps(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        noises, timesteps = [], []
        for one in latents.split(1):
            noise = torch.randn(one.shape, generator=self.generator, device=self.device)
            noises.append(self.family.prepare_noise(noise, self.generator))
            timesteps.append(self.family.sample_timesteps(one, self.generator))
        return torch.cat(noises).to(latents), torch.cat(timesteps)

    def _next_batch(self) -> tuple[torch.Tensor, dict]:
        position = self.state.data
        while True:
            if not self._batches:
                self._batches = self.order.epoch(position.epoch)
            if position.batch < len(self._batches):
                break
            position.epoch += 1
            position.batch = 0
            self._batches = []
        indices = self._batches[position.batch]
        position.batch += 1
        chosen = [self.samples[i] for i in indices]
        latents = torch.stack([s.latents for s in chosen])
        drawn = [s.draw_conditioning(self.caption_generator) for s in chosen]
        conditioning = {k: torch.stack([c[k] for c in drawn]) for k in drawn[0]}
        return latents, conditioning

    # -- the loop ------------------------------------------------------------------------

    def step(self) -> torch.Tensor:
        """One optimizer step over `gradient_accumulation` micro-batches; returns the mean loss
        (a device tensor: reading it is left to whoever logs, to keep the step free of syncs).

        Under cudaMallocAsync (a ComfyUI server's allocator) a step that runs out of memory runs once more
        after the pool is trimmed: that pool keeps what earlier steps freed in the sizes they were carved
        (other buckets' activations, a preview's) and, unlike PyTorch's own allocator, does not give it back
        and retry when the card is full. A failed step leaves no trace, so the second attempt draws the
        same batch, noise and timesteps and the run is the one that would have been."""
        try:
            return self._step()
        except torch.OutOfMemoryError:
            if not under_cuda_malloc_async(self.device):
                raise
        # Here, after the failed attempt's exception is let go: its traceback held that attempt's memory.
        log.warning("out of GPU memory in step %d under cudaMallocAsync; its pool gives back the memory earlier "
                    "steps freed and the step runs again", self.state.step + 1)
        torch.cuda.empty_cache()
        return self._step()

    def _step(self) -> torch.Tensor:
        cfg = self.config
        factor = lr_factor(self.state.step, cfg.schedule, cfg.warmup_steps, cfg.steps)
        for group, base in zip(self.optimizer.param_groups, self.group_learning_rates, strict=True):
            group["lr"] = base * factor
        total = torch.zeros((), device=self.device)
        before = self._progress()
        try:
            for _ in range(cfg.gradient_accumulation):
                latents, conditioning = self._next_batch()
                noise, timesteps = self.draw_noise_and_timesteps(latents)
                tensors = (latents, noise, timesteps, *(conditioning[k] for k in self._conditioning_keys))
                if self._graphed is None:
                    loss = self._forward_backward(*tensors)
                else:
                    # A replay runs none of the model's Python, where ComfyUI checks its Cancel.
                    comfy.model_management.throw_exception_if_processing_interrupted()
                    loss = self._graphed(*tensors)
                total += loss / cfg.gradient_accumulation
                self.state.samples_seen += latents.shape[0]
        except BaseException:
            # A step that does not finish (ComfyUI's Cancel raises inside the model's forward, or CUDA
            # runs out of memory) leaves no trace, so a checkpoint saved next resumes exactly where it
            # would have gone on. The failed frames' locals go now, on this thread: the step's graph and
            # activations (memory a checkpoint saved next may need), and contexts the model left open
            # (torch < 2.12's checkpoint keeps its saved-tensor hooks pushed in a suspended generator,
            # whose cleanup on another thread fails with "SavedTensorHooks ... INTERNAL ASSERT FAILED").
            traceback.clear_frames(sys.exc_info()[2])
            self.optimizer.zero_grad(set_to_none=True)
            self._restore_progress(before)
            raise
        if cfg.max_grad_norm > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.lora_parameters(), cfg.max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.step += 1
        return total

    def _forward_backward(self, latents, noise, timesteps, *conditioning_values) -> torch.Tensor:
        """One micro-batch's loss and backward; returns the loss, detached."""
        conditioning = dict(zip(self._conditioning_keys, conditioning_values, strict=True))
        try:
            loss = self.loss(latents, conditioning, noise, timesteps)
            self.scaler.scale(loss / self.config.gradient_accumulation).backward()
        except BaseException:
            if self._swapper is not None:
                # Inside a recording, a block's copy left pending would hide this error behind CUDA's
                # "capturing stream has unjoined work".
                self._swapper.join()
            raise
        return loss.detach()

    @property
    def holds_graphs(self) -> bool:
        """Whether recorded steps hold their memory between steps now (graphs.py)."""
        return self._graphed is not None and self._graphed.graph_count > 0

    def release_graphs(self) -> None:
        """Gives back the recorded steps' memory for something else on the card between steps (a preview's
        sampler and VAE); each shape is recorded again at its next step."""
        if self._graphed is not None:
            self._graphed.release()

    def current_lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def run(self, on_step: Callable[["Trainer", list[StepReport]], bool] | None = None) -> LoraNetwork:
        """Trains until `config.steps`. `on_step(trainer, reports)` runs after every step and
        returns False to stop there; `reports` holds the steps whose loss was read this time:
        losses are read from the device every `log_every` steps, one sync for the lot."""
        with self.session():
            pending: list[tuple[int, torch.Tensor, float, int]] = []
            while self.state.step < self.config.steps:
                loss = self.step()
                # Here, not in a JobHook: the average follows every completed step, the run's last one
                # included, after which no hook is due.
                if self.ema is not None:
                    self.ema.update()
                pending.append((self.state.step, loss, self.current_lr(), self.state.samples_seen))
                reports = []
                if self.state.step % self.config.log_every == 0 or self.state.step == self.config.steps:
                    reports = self._read_losses(pending)
                    pending.clear()
                if on_step is not None and on_step(self, reports) is False:
                    break
        return self.network

    def _read_losses(self, pending) -> list[StepReport]:
        values = torch.stack([loss for _, loss, _, _ in pending]).tolist()
        reports = [
            StepReport(step, self.config.steps, value, lr, seen)
            for (step, _, lr, seen), value in zip(pending, values, strict=True)
        ]
        bad = next((r for r in reports if not math.isfinite(r.loss)), None)
        if bad is not None:
            raise FloatingPointError(
                f"the loss became {bad.loss} at step {bad.step}; lower train.learning_rate or use precision bf16/fp32"
            )
        return reports
