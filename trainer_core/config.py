"""Plain configuration dataclasses. Each validates itself and names the field that is wrong."""

import math
import re
from dataclasses import asdict, dataclass, field, fields

# Preset name -> kinds of layers adapted (see families.base.LayerKind).
TARGET_PRESETS = {
    "attention": ("attention",),
    "attention+mlp": ("attention", "mlp"),
    "all-linear": ("attention", "mlp", "linear"),
    "attention+mlp+conv": ("attention", "mlp", "conv"),
}
OPTIMIZERS = ("adamw", "adamw8bit", "adafactor", "prodigy")
SCHEDULES = ("constant", "constant_with_warmup", "cosine", "linear")
PRECISIONS = ("bf16", "fp16", "fp32")
TIMESTEP_SAMPLING = ("logit_normal", "uniform", "sigmoid")
LOSSES = ("mse", "huber")
COMPILE_MODES = ("auto", "on", "off")
ATTENTION_KERNELS = ("auto", "flash", "cudnn")
CUDA_GRAPH_MODES = ("auto", "off")
BLOCKS_TO_SWAP_AUTO = -1
# More blocks than any supported model has (Flux: 57, SD3.5 Large: 38, SDXL: 70 checkpointed blocks).
MAX_BLOCKS_TO_SWAP = 1000
SAVE_DTYPES = ("bf16", "fp16", "fp32")
# Above it every optimizer here diverges in the first steps (adaptive ones, Prodigy, take 1.0); inf, NaN
# and values like 1e38 would make the weights non-finite before the loss shows it.
MAX_LEARNING_RATE = 10.0
# A million steps is weeks on any card; a larger count is a typo (and overflows the ETA's arithmetic).
MAX_STEPS = 1_000_000
# Adapter algorithms (lora.py): plain LoRA (LoCon on convolutions), LyCORIS' LoHa and LoKr, and DoRA.
ALGORITHMS = ("lora", "loha", "lokr", "dora")
# Text encoders that get a LoRA (text_encoders.py): none, every CLIP of the model (CLIP-L, and CLIP-G where it has
# one), or the CLIPs and T5-XXL. Names are the encoders' attributes on ComfyUI's CLIP model.
TEXT_ENCODER_PRESETS = {"none": (), "clip": ("clip_l", "clip_g"), "clip+t5": ("clip_l", "clip_g", "t5xxl")}
# Key layouts of the LoRA file: kohya's `lora_unet_*` names, or diffusers' own (diffusers_format.py).
SAVE_FORMATS = ("comfyui", "diffusers")


# LoRA+'s paper suggests 16 for the up matrices' learning-rate ratio; far above it training diverges.
MAX_LORAPLUS_RATIO = 1000.0


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the field and what to use instead."""


def _require(condition: bool, owner: str, name: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"{owner}.{name}: {message}")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _one_of(owner: str, name: str, value, allowed) -> None:
    _require(value in allowed, owner, name, f"{value!r} is not one of {', '.join(map(repr, allowed))}")


@dataclass(frozen=True)
class LoraConfig:
    rank: int = 16
    alpha: float = 16.0
    dropout: float = 0.0
    targets: str = "attention+mlp"
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    algorithm: str = "lora"  # one of ALGORITHMS
    # LoKr: each weight is kron(w1, w2); `lokr_factor` is w1's side (-1: the divisor nearest the square
    # root); `lokr_full_rank` keeps w2 a full matrix, else w2 = w2_a @ w2_b of rank `rank`.
    lokr_factor: int = -1
    lokr_full_rank: bool = False
    # Which text encoders also get a LoRA (TEXT_ENCODER_PRESETS); their layers follow `targets`.
    text_encoders: str = "none"

    def __post_init__(self):
        owner = "lora"
        _one_of(owner, "algorithm", self.algorithm, ALGORITHMS)
        factor_ok = isinstance(self.lokr_factor, int) and (self.lokr_factor == -1 or self.lokr_factor >= 1)
        _require(factor_ok, owner, "lokr_factor",
                 f"must be -1 (automatic) or an integer >= 1, got {self.lokr_factor!r}")
        _require(isinstance(self.lokr_full_rank, bool), owner, "lokr_full_rank",
                 f"must be true or false, got {self.lokr_full_rank!r}")
        rank_ok = isinstance(self.rank, int) and self.rank >= 1
        _require(rank_ok, owner, "rank", f"must be an integer >= 1, got {self.rank!r}")
        _require(self.alpha > 0, owner, "alpha", f"must be > 0, got {self.alpha!r}")
        _require(0.0 <= self.dropout < 1.0, owner, "dropout", f"must be in [0, 1), got {self.dropout!r}")
        _one_of(owner, "targets", self.targets, TARGET_PRESETS)
        _one_of(owner, "text_encoders", self.text_encoders, TEXT_ENCODER_PRESETS)
        for name in ("include", "exclude"):
            for pattern in getattr(self, name):
                try:
                    re.compile(pattern)
                except re.error as error:
                    message = f"{pattern!r} is not a valid regular expression ({error})"
                    raise ConfigError(f"{owner}.{name}: {message}") from None

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def layer_kinds(self) -> tuple[str, ...]:
        return TARGET_PRESETS[self.targets]

    @property
    def trained_text_encoders(self) -> tuple[str, ...]:
        return TEXT_ENCODER_PRESETS[self.text_encoders]


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000
    learning_rate: float = 1e-4
    # Learning rate of the text encoders' LoRA (LoraConfig.text_encoders); 0 uses `learning_rate`.
    text_encoder_lr: float = 0.0
    batch_size: int = 1
    gradient_accumulation: int = 1
    optimizer: str = "adamw"
    weight_decay: float = 0.01
    schedule: str = "constant"
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    precision: str = "bf16"
    gradient_checkpointing: bool = True
    # torch.compile each block (see bench/NOTES.md §3): "auto" compiles on CUDA with Triton installed,
    # for the families where it pays (SD3, Flux); CPU runs stay eager. "on" compiles any family.
    compile_blocks: str = "auto"
    # Which fused attention kernel PyTorch's SDPA tries first (see bench/NOTES.md §4): "auto" takes
    # cuDNN's on Hopper with cuDNN >= 9.19 once a check in a child process passes (measured faster and
    # equal there), else flash.
    attention: str = "auto"
    # Replay each step's forward and backward as a CUDA graph (see graphs.py): "auto" does so on CUDA
    # where a step has one backward, no fp16 gradient scaler and no LoRA dropout; "off" runs every
    # step eagerly.
    cuda_graphs: str = "auto"
    # Blocks of the diffusion model kept in host memory and copied to the card just before they compute
    # (blockswap.py): 0 keeps all on the card; BLOCKS_TO_SWAP_AUTO (-1, the default) swaps none where the
    # model fits the card and else the fewest that let a step fit (none without gradient_checkpointing);
    # a count needs gradient_checkpointing.
    blocks_to_swap: int = BLOCKS_TO_SWAP_AUTO
    seed: int = 0
    loss: str = "mse"
    huber_delta: float = 0.1
    # Rectified-flow families (SD3, Flux).
    timestep_sampling: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    flux_guidance: float = 1.0
    # Discrete-schedule family (SDXL).
    noise_offset: float = 0.0
    min_snr_gamma: float = 0.0
    log_every: int = 1
    # Validation loss on the dataset's held-out images every N steps (0: only at the end); the
    # held-out set itself is the dataset's (DatasetConfig.validation_split / validation_folder).
    validation_every: int = 0
    # EMA of the LoRA weights (ema.py): ema <- decay * ema + (1 - decay) * weights after every step;
    # previews and the saved LoRA use it. 0 turns it off.
    ema_decay: float = 0.0
    # LoRA+ (kohya's loraplus_lr_ratio): the up (B) matrices learn at this multiple of the learning
    # rate, in a parameter group of their own (loraplus.py). 1 turns it off.
    loraplus_lr_ratio: float = 1.0
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        owner = "train"
        for name in ("steps", "batch_size", "gradient_accumulation", "log_every"):
            value = getattr(self, name)
            _require(isinstance(value, int) and value >= 1, owner, name, f"must be an integer >= 1, got {value!r}")
        _require(self.steps <= MAX_STEPS, owner, "steps", f"must be <= {MAX_STEPS}, got {self.steps!r}")
        lr = self.learning_rate
        lr_ok = isinstance(lr, (int, float)) and not isinstance(lr, bool) and 0 < lr <= MAX_LEARNING_RATE
        _require(lr_ok, owner, "learning_rate", f"must be a number > 0 and <= {MAX_LEARNING_RATE:g} (AdamW trains "
                 f"LoRAs at 1e-5 to 1e-3, Prodigy at 1.0), got {lr!r}")
        te_lr = self.text_encoder_lr
        te_lr_ok = isinstance(te_lr, (int, float)) and not isinstance(te_lr, bool) and 0 <= te_lr <= MAX_LEARNING_RATE
        _require(te_lr_ok, owner, "text_encoder_lr", f"must be a number >= 0 and <= {MAX_LEARNING_RATE:g} (0 uses "
                 f"learning_rate; text encoders train at 1e-5 to 5e-5 with AdamW), got {te_lr!r}")
        _require(self.warmup_steps >= 0, owner, "warmup_steps", f"must be >= 0, got {self.warmup_steps!r}")
        _require(self.max_grad_norm >= 0, owner, "max_grad_norm", "must be >= 0 (0 turns clipping off)")
        _require(self.weight_decay >= 0, owner, "weight_decay", f"must be >= 0, got {self.weight_decay!r}")
        _one_of(owner, "optimizer", self.optimizer, OPTIMIZERS)
        _one_of(owner, "schedule", self.schedule, SCHEDULES)
        _one_of(owner, "precision", self.precision, PRECISIONS)
        _one_of(owner, "timestep_sampling", self.timestep_sampling, TIMESTEP_SAMPLING)
        _one_of(owner, "loss", self.loss, LOSSES)
        _one_of(owner, "compile_blocks", self.compile_blocks, COMPILE_MODES)
        _one_of(owner, "attention", self.attention, ATTENTION_KERNELS)
        _one_of(owner, "cuda_graphs", self.cuda_graphs, CUDA_GRAPH_MODES)
        swap = self.blocks_to_swap
        swap_ok = isinstance(swap, int) and not isinstance(swap, bool)
        _require(swap_ok and BLOCKS_TO_SWAP_AUTO <= swap <= MAX_BLOCKS_TO_SWAP, owner, "blocks_to_swap",
                 f"must be an integer from 0 to {MAX_BLOCKS_TO_SWAP}, or -1 (auto), got {swap!r}")
        _require(swap <= 0 or self.gradient_checkpointing, owner, "blocks_to_swap", "needs gradient_checkpointing "
                 "on (without it a swapped block's weights stay on the card until the backward): turn it on, or "
                 "set blocks_to_swap to 0")
        _require(self.logit_std > 0, owner, "logit_std", f"must be > 0, got {self.logit_std!r}")
        _require(self.noise_offset >= 0, owner, "noise_offset", f"must be >= 0, got {self.noise_offset!r}")
        _require(self.min_snr_gamma >= 0, owner, "min_snr_gamma", "must be >= 0 (0 turns the weighting off)")
        every = self.validation_every
        _require(isinstance(every, int) and not isinstance(every, bool) and every >= 0, owner, "validation_every",
                 f"must be an integer >= 0 (0: only at the end), got {every!r}")
        decay = self.ema_decay
        _require(_is_number(decay) and 0.0 <= decay < 1.0, owner, "ema_decay",
                 f"must be a number in [0, 1) (0 turns EMA off; 0.99 to 0.9999 are usual), got {decay!r}")
        ratio = self.loraplus_lr_ratio
        _require(_is_number(ratio) and 0 < ratio <= MAX_LORAPLUS_RATIO, owner, "loraplus_lr_ratio",
                 f"must be a number > 0 and <= {MAX_LORAPLUS_RATIO:g} (1 turns LoRA+ off; 16 is LoRA+'s "
                 f"suggestion), got {ratio!r}")
        _require(ratio == 1.0 or self.optimizer != "prodigy", owner, "loraplus_lr_ratio",
                 "prodigy estimates one learning rate for all parameters and takes no other for the up matrices: "
                 "set it to 1, or use adamw, adamw8bit or adafactor")

    @property
    def text_encoder_learning_rate(self) -> float:
        return self.text_encoder_lr or self.learning_rate

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(
                f"train: unknown field(s) {', '.join(unknown)}; known fields are {', '.join(sorted(known))}"
            )
        return cls(**values)


@dataclass(frozen=True)
class DatasetFacts:
    """What a LoRA file's metadata says about the data it was trained on (kohya's `ss_*` keys)."""

    tag_frequency: dict[str, dict[str, int]]  # dataset folder name -> tag -> captions that have it
    num_train_images: int  # images x repeats, per epoch
    resolution: int  # the training side length


@dataclass(frozen=True)
class SaveConfig:
    """Where a run's files go: the LoRA as `<loras>/<name>/<name>.safetensors`, checkpoints under
    `<output_dir>/<name>/checkpoints/` (output_dir "" is ComfyUI's output folder)."""

    name: str = "lora"
    dtype: str = "bf16"
    every: int = 0  # checkpoint every this many steps; 0: only when a run is cancelled
    keep_last: int = 3  # checkpoints kept; 0 keeps all
    output_dir: str = ""
    trigger_word: str = ""
    format: str = "comfyui"  # one of SAVE_FORMATS
    dataset: DatasetFacts | None = None  # set once the dataset is read; None leaves its keys out

    def __post_init__(self):
        owner = "save"
        # The name becomes a folder and a file name in ComfyUI's model and output folders.
        # Windows drops a trailing dot or space from folder names, so the name must not end in one.
        name_ok = re.fullmatch(r"[A-Za-z0-9](?:[A-Za-z0-9._ -]{0,126}[A-Za-z0-9_-])?", self.name) is not None
        _require(name_ok, owner, "name", f"{self.name!r} must be 1-128 letters, digits, '.', '_', '-' or spaces, "
                 "starting with a letter or digit and not ending in '.' or a space")
        _one_of(owner, "dtype", self.dtype, SAVE_DTYPES)
        _one_of(owner, "format", self.format, SAVE_FORMATS)
        for name in ("every", "keep_last"):
            value = getattr(self, name)
            _require(isinstance(value, int) and value >= 0, owner, name, f"must be an integer >= 0, got {value!r}")


def check_save_format(lora: LoraConfig, save: SaveConfig) -> None:
    """Refuses, before a run starts, a file format that cannot hold the LoRA's algorithm: diffusers' key
    layout has names for plain LoRA weights only."""
    if save.format == "diffusers" and lora.algorithm != "lora":
        raise ConfigError(f"save.format: 'diffusers' holds plain LoRA only, and lora.algorithm is "
                          f"{lora.algorithm!r}: set save.format to 'comfyui' (ComfyUI's LoRA Loader reads it) "
                          "or lora.algorithm to 'lora'")
