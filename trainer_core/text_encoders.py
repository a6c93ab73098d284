"""LoRA on the text encoders of a ComfyUI CLIP (CLIP-L, CLIP-G, T5-XXL), trained with the diffusion model's.

Each trained encoder gets the same `LoraNetwork` as the diffusion model, on its transformer
(`clip_l.transformer`, ...), its layers made by `lora_layer_for` and hooked only for the run. The layers
follow LoraConfig.targets: `attention` adapts CLIP's q/k/v/out projections and T5's q/k/v/o, `mlp` also
CLIP's fc1/fc2 and T5's wi/wo: the layers ComfyUI's LoRA loader maps for text encoders
(`comfy.lora.model_lora_keys_clip`), which the network is checked against when it is made.

A trained encoder's output changes every step, so its embeddings cannot be cached: the dataset keeps each
caption's tokens instead (`data.caption_token_tensors`), and every step encodes its batch's captions
through ComfyUI's own `encode_token_weights`, with gradients, so the conditioning is exactly what
`CLIPTextEncode` gives with the LoRA applied. The encoders that are not trained run once per caption
before training; their outputs are kept in memory and handed back in their place, so they never run
(nor sit on the card) during the steps. The trained encoders are on the training device only while the
run trains, and go back to ComfyUI's offload device when it ends.

ComfyUI's CLIP and T5 layers add into their input in place after a norm saved it for backward (as Flux's
blocks do); while training, the norms take a copy of their input.
"""

import contextlib
import functools
import logging

import comfy.lora
import comfy.model_management
import torch
from torch import nn

from . import comfy_compat
from .checkpointing import make_autograd_safe
from .config import TEXT_ENCODER_PRESETS, ConfigError, LoraConfig
from .lora import LoraNetwork, lora_layer_for, select_targets

log = logging.getLogger(__name__)

# Encoder attribute on ComfyUI's CLIP model -> its key in the tokenizer's output.
ENCODER_STREAMS = {"clip_l": "l", "clip_g": "g", "t5xxl": "t5xxl"}
ENCODER_NAMES = {"clip_l": "CLIP-L", "clip_g": "CLIP-G", "t5xxl": "T5-XXL"}
# kohya's prefixes, which ComfyUI maps for SDXL (te1 CLIP-L, te2 CLIP-G), SD3 (te3 T5) and Flux (te1 CLIP-L,
# te3 T5).
KOHYA_PREFIXES = {"clip_l": "lora_te1_", "clip_g": "lora_te2_", "t5xxl": "lora_te3_"}
# diffusers' pipelines name CLIP-L `text_encoder` and CLIP-G `text_encoder_2`; ComfyUI maps both. It maps no
# diffusers name of T5.
DIFFUSERS_PREFIXES = {"clip_l": "text_encoder.", "clip_g": "text_encoder_2."}
# Keys of a training sample's conditioning when its captions are encoded while training.
TOKENS, WEIGHTS, SIZE = "tokens.", "weights.", "size"
LAYER_RULES = (
    ("self_attn.q_proj", "attention"), ("self_attn.k_proj", "attention"), ("self_attn.v_proj", "attention"),
    ("self_attn.out_proj", "attention"), ("mlp.fc1", "mlp"), ("mlp.fc2", "mlp"),  # CLIP
    ("SelfAttention.q", "attention"), ("SelfAttention.k", "attention"), ("SelfAttention.v", "attention"),
    ("SelfAttention.o", "attention"), ("DenseReluDense.wi_0", "mlp"), ("DenseReluDense.wi_1", "mlp"),
    ("DenseReluDense.wi", "mlp"), ("DenseReluDense.wo", "mlp"),  # T5
)


def text_layer_kind(name: str, module: nn.Module) -> str:
    """The kind of a text encoder's layer, as families classify the diffusion model's ("" never adapted)."""
    return next((kind for suffix, kind in LAYER_RULES if name.endswith("." + suffix)), "")


def encoders_of(clip) -> dict[str, nn.Module]:
    """The encoders a ComfyUI CLIP holds, by attribute name (SD3's may lack any of its three)."""
    model = clip.cond_stage_model
    return {name: getattr(model, name) for name in ENCODER_STREAMS if getattr(model, name, None) is not None}


def trained_encoders(clip, config: LoraConfig) -> list[str]:
    """The encoders of `clip` that `config.text_encoders` trains; raises ConfigError where it names one the
    model lacks (T5 on SDXL) or none is left."""
    present = encoders_of(clip)
    wanted = TEXT_ENCODER_PRESETS[config.text_encoders]
    has = ", ".join(ENCODER_NAMES[name] for name in present) or "no text encoder"
    if "t5xxl" in wanted and "t5xxl" not in present:
        raise ConfigError(f"lora.text_encoders: {config.text_encoders!r} trains T5-XXL, but this model's CLIP has "
                          f"{has}: use 'clip'")
    names = [name for name in wanted if name in present]
    if wanted and not names:
        raise ConfigError(f"lora.text_encoders: this model's CLIP has {has}, none of which "
                          f"{config.text_encoders!r} trains: use 'none'")
    return names


class TextEncoderLoras(nn.Module):
    """One LoraNetwork per trained encoder, keyed by the encoder's attribute name; each network's layer
    names are module paths inside that encoder's `transformer`."""

    def __init__(self, networks: dict[str, LoraNetwork]):
        super().__init__()
        self.networks = nn.ModuleDict(networks)

    @classmethod
    def create(cls, encoders: dict[str, nn.Module], config: LoraConfig) -> "TextEncoderLoras":
        # Include / exclude patterns name the diffusion model's layers; the encoders take the preset alone.
        preset_only = LoraConfig(rank=config.rank, alpha=config.alpha, dropout=config.dropout, targets=config.targets)
        networks = {}
        for name, encoder in encoders.items():
            modules = dict(encoder.transformer.named_modules())
            paths = select_targets(encoder.transformer, text_layer_kind, preset_only)
            networks[name] = LoraNetwork({path: lora_layer_for(modules[path], config) for path in paths})
        return cls(networks)

    def items(self):
        return self.networks.items()

    def kohya_names(self) -> dict[str, str]:
        """kohya layer name (`lora_te1_text_model_encoder_layers_0_mlp_fc1`) -> (encoder, module path)."""
        return {KOHYA_PREFIXES[encoder] + path.replace(".", "_"): (encoder, path)
                for encoder, network in self.items() for path, _ in network.items()}

    def check_comfyui_reads(self, clip) -> None:
        """Raises ValueError naming a layer whose key ComfyUI's LoRA loader would skip for this CLIP."""
        known = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, {})
        for name, (encoder, _) in self.kohya_names().items():
            if name not in known:
                raise ValueError(f"ComfyUI's LoRA loader does not map {name!r} for this CLIP (is its "
                                 f"{ENCODER_NAMES[encoder]} where ComfyUI expects it?); train lora.text_encoders "
                                 "'none' for this model")


def _clone_input(module, args):
    if torch.is_grad_enabled():
        return (args[0].clone(), *args[1:])
    return None


def _plain_copy(value):
    """`value` (tensors in tuples and dicts, or None) with every tensor copied outside inference mode."""
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, tuple):
        return tuple(_plain_copy(v) for v in value)
    if isinstance(value, dict):
        return {k: _plain_copy(v) for k, v in value.items()}
    return value


def _token_key(pairs) -> tuple:
    return tuple(tuple(tuple(pair) for pair in chunk) for chunk in pairs)


class CaptionEncoding:
    """Turns a batch's caption tokens into the family's conditioning while training, through the CLIP
    with its text encoders' LoRA attached: trained encoders run with gradients, the others' outputs come
    from memory (filled by `prepare`)."""

    def __init__(self, clip, config: LoraConfig, family, device: torch.device):
        self.clip = clip
        self.family = family
        self.device = device
        encoders = encoders_of(clip)
        names = trained_encoders(clip, config)
        self.trained = {name: encoders[name] for name in names}
        self.frozen = {name: encoder for name, encoder in encoders.items() if name not in names}
        if clip.patcher.patches:
            raise ConfigError("lora.text_encoders: this CLIP carries a LoRA already (a LoRA Loader before Train "
                              "LoRA); connect the CLIP of the model loader to train its text encoders")
        self.loras = TextEncoderLoras.create(self.trained, config)
        self.loras.check_comfyui_reads(clip)
        self.loras.to(device)
        # Encoder name -> token key -> what its encode_token_weights returned.
        self._outputs: dict[str, dict[tuple, tuple]] = {name: {} for name in self.frozen}

    @property
    def names(self) -> list[str]:
        return list(self.trained)

    # -- before training -------------------------------------------------------------------------

    def prepare(self, conditionings: list[dict[str, torch.Tensor]]) -> None:
        """Runs the untrained encoders once on every caption of `conditionings` (the samples' token
        entries) and keeps their outputs; then takes the CLIP off the card."""
        if not self.frozen:
            return
        captions = {}
        for conditioning in conditionings:
            tokens = self._tokens(conditioning)
            captions.setdefault(_token_key(tuple(tokens.values())), tokens)
        with torch.inference_mode():
            self.clip.load_model()
            outputs = []
            with self._clip_options():
                for tokens in captions.values():
                    comfy.model_management.throw_exception_if_processing_interrupted()
                    outputs.append({name: encoder.encode_token_weights(tokens[ENCODER_STREAMS[name]])
                                    for name, encoder in self.frozen.items()})
        comfy_compat.unload_models([self.clip.patcher])
        # Made under inference mode, they could not enter the trained encoders' graph: plain copies.
        for tokens, output in zip(captions.values(), outputs, strict=True):
            for name, value in output.items():
                self._outputs[name][_token_key(tokens[ENCODER_STREAMS[name]])] = _plain_copy(value)
        held = sum(t.numel() * t.element_size() for stored in self._outputs.values() for value in stored.values()
                   for t in _tensors_in(value))
        log.info("text encoders not trained (%s): outputs of %d captions computed once and held in memory "
                 "(%.1f MiB)", ", ".join(ENCODER_NAMES[n] for n in self.frozen), len(captions), held / 2**20)

    @staticmethod
    def _tokens(conditioning: dict[str, torch.Tensor]) -> dict[str, list]:
        """ComfyUI's token-weight pairs ({stream: [chunk of (token, weight)]}) of one sample's entries."""
        tokens = {}
        for key, ids in conditioning.items():
            if key.startswith(TOKENS):
                stream = key[len(TOKENS):]
                weights = conditioning[WEIGHTS + stream].tolist()
                tokens[stream] = [list(zip(row, weight_row, strict=True))
                                  for row, weight_row in zip(ids.tolist(), weights, strict=True)]
        return tokens

    @contextlib.contextmanager
    def _clip_options(self):
        """The encoders' options as CLIP.encode_from_tokens sets them (its layer, i.e. clip skip)."""
        model = self.clip.cond_stage_model
        model.reset_clip_options()
        if self.clip.layer_idx is not None:
            model.set_clip_options({"layer": self.clip.layer_idx})
        try:
            yield
        finally:
            model.reset_clip_options()

    # -- during training -------------------------------------------------------------------------

    @contextlib.contextmanager
    def attached(self):
        """The trained encoders on the training device with their LoRA hooked on, the others answered from
        memory; all undone on exit, also on error."""
        comfy_compat.unload_models([self.clip.patcher])
        with torch.inference_mode():
            # As Trainer.session loads the diffusion model: moved weights are then copied by make_autograd_safe.
            for encoder in self.trained.values():
                encoder.to(self.device)
        with torch.inference_mode(False):
            for encoder in self.trained.values():
                make_autograd_safe(encoder)
        handles = [module.register_forward_pre_hook(_clone_input)
                   for encoder in self.trained.values() for module in encoder.transformer.modules()
                   if type(module).__name__.endswith("LayerNorm")]
        try:
            with contextlib.ExitStack() as stack:
                for name, network in self.loras.items():
                    stack.enter_context(network.attached(self.trained[name].transformer))
                for name, encoder in self.frozen.items():
                    encoder.encode_token_weights = functools.partial(self._stored_output, name)
                    stack.callback(delattr, encoder, "encode_token_weights")
                stack.enter_context(self._clip_options())
                self._log_cost()
                yield
        finally:
            for handle in handles:
                handle.remove()
            for encoder in self.trained.values():
                encoder.to(self.clip.patcher.offload_device)

    def _stored_output(self, name: str, pairs):
        key = _token_key(pairs)
        stored = self._outputs[name]
        if key not in stored:
            # A text that is no caption of the dataset (a preview's prompt): the encoder runs where its weights
            # are (ComfyUI's offload device), once per text.
            encoder = self.frozen[name]
            with torch.no_grad():
                stored[key] = type(encoder).encode_token_weights(encoder, pairs)
        return stored[key]

    def encode_text(self, text: str) -> list:
        """ComfyUI's conditioning of `text` ([[cond, {"pooled_output": ...}]], as CLIPTextEncode gives) through
        the encoders as they train, for previews during the run; without gradients or LoRA dropout."""
        tokens = self.clip.tokenize(text)
        was_training = self.loras.training
        self.loras.eval()
        try:
            with torch.no_grad():
                output = self.clip.cond_stage_model.encode_token_weights(tokens)
        finally:
            self.loras.train(was_training)
        extra = output[2] if len(output) > 2 else {}
        return [[output[0], {"pooled_output": output[1], **extra}]]

    def _log_cost(self) -> None:
        weights = sum(p.numel() * p.element_size() for e in self.trained.values() for p in e.parameters())
        lora = sum(p.numel() for p in self.loras.parameters())
        log.info("training the text encoders %s: %.2f GiB of their weights stay on %s for the run, their LoRA "
                 "has %d parameters; every step encodes its captions through them, forward and backward (their "
                 "embeddings cannot be cached)", ", ".join(ENCODER_NAMES[n] for n in self.trained),
                 weights / 2**30, self.device, lora)

    def conditioning(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The family's conditioning (B, ...) of a batch of token entries, through the trained encoders."""
        sizes = batch[SIZE].tolist()
        conditionings = []
        for index, (width, height) in enumerate(sizes):
            one = {key: value[index] for key, value in batch.items() if key.startswith((TOKENS, WEIGHTS))}
            cond, pooled = self.clip.cond_stage_model.encode_token_weights(self._tokens(one))[:2]
            conditionings.append(self.family.conditioning(cond.to(self.device), pooled.to(self.device), width, height))
        return {key: torch.stack([c[key] for c in conditionings]) for key in conditionings[0]}


def _tensors_in(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _tensors_in(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors_in(item)
