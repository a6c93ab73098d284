"""Preview images through ComfyUI's own samplers, for the Sample Preview node and for the
periodic samples of a training run (where the LoRA is attached to the model's modules)."""

import logging
from dataclasses import dataclass, replace
from pathlib import Path

import comfy.model_management
import comfy.sample
import node_helpers
import torch
from PIL import Image

from . import comfy_compat
from .config import ConfigError, TrainConfig
from .ema import ema_weights
from .families import family_for
from .job import Event, JobHook

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SampleSettings:
    """0 (or "") for cfg, steps, guidance, sampler and scheduler means the family's default."""

    prompts: tuple[str, ...]
    seed: int = 42
    width: int = 1024
    height: int = 1024
    steps: int = 0
    cfg: float = 0.0
    guidance: float = 0.0
    sampler: str = ""
    scheduler: str = ""
    negative: str = ""

    def __post_init__(self):
        if not self.prompts or not all(p.strip() for p in self.prompts):
            raise ConfigError("sample.prompts: give at least one prompt, and no empty ones")
        for name in ("width", "height"):
            value = getattr(self, name)
            if value < 16 or value % 16:
                raise ConfigError(f"sample.{name}: must be a multiple of 16 and at least 16, got {value}")
        if self.steps < 0 or self.cfg < 0 or self.guidance < 0:
            raise ConfigError("sample: steps, cfg and guidance must be >= 0 (0 picks the model family's default)")

    def resolved(self, patcher) -> "SampleSettings":
        defaults = family_for(patcher.model, TrainConfig()).sampling_defaults()
        return replace(
            self,
            steps=self.steps or defaults["steps"],
            cfg=self.cfg or defaults["cfg"],
            guidance=(self.guidance or defaults["guidance"]) if defaults["guidance"] is not None else 0.0,
            sampler=self.sampler or defaults["sampler"],
            scheduler=self.scheduler or defaults["scheduler"],
        )


@dataclass
class EncodedPrompts:
    positives: list[list]
    negative: list


def encode_prompts(clip, settings: SampleSettings, text_encoding=None) -> EncodedPrompts:
    """Text conditionings, computed once: a run samples many times from the same prompts. With
    `text_encoding` (a run's text_encoders.CaptionEncoding), through its text encoders as they train."""

    def encode(text: str) -> list:
        if text_encoding is not None:
            conditioning = text_encoding.encode_text(text)
        else:
            conditioning = clip.encode_from_tokens_scheduled(clip.tokenize(text))
        # SDXL's size embedding reads these; the other families ignore them.
        size = {"width": settings.width, "height": settings.height,
                "target_width": settings.width, "target_height": settings.height}
        if settings.guidance:
            size["guidance"] = settings.guidance
        return node_helpers.conditioning_set_values(conditioning, size)

    return EncodedPrompts([encode(p) for p in settings.prompts], encode(settings.negative))


def _latent_shape(patcher, settings: SampleSettings) -> list[int]:
    channels = patcher.get_model_object("latent_format").latent_channels
    return [1, channels, settings.height // 8, settings.width // 8]


def preview_memory(patcher, vae, settings: SampleSettings) -> int:
    """Bytes a preview needs free on the card beside the model, by ComfyUI's own estimates (what its loaders
    ask to find free): the sampler's for cond and uncond in one batch, or the VAE's weights and decode,
    whichever is more, plus what ComfyUI keeps for inference and for other programs (`--reserve-vram`)."""
    latent = _latent_shape(patcher, settings)
    sampler = patcher.model.memory_required([2, *latent[1:]])
    decoder = vae.memory_used_decode(latent, vae.vae_dtype) + vae.patcher.model_size()
    return int(max(sampler, decoder) + comfy.model_management.minimum_inference_memory()
               + comfy.model_management.extra_reserved_memory())


def sample_images(patcher, vae, encoded: EncodedPrompts, settings: SampleSettings) -> torch.Tensor:
    """One image per prompt, all from the same seed: (N, H, W, 3) floats in [0, 1]."""
    empty = torch.zeros(_latent_shape(patcher, settings))
    images = []
    for positive in encoded.positives:
        noise = comfy.sample.prepare_noise(empty, settings.seed)
        latents = comfy.sample.sample(
            patcher, noise, settings.steps, settings.cfg, settings.sampler, settings.scheduler,
            positive, encoded.negative, empty, seed=settings.seed, disable_pbar=True,
        )
        images.append(vae.decode(latents).to(comfy.model_management.intermediate_device()))
    return torch.cat(images).clamp(0, 1)


class SampleHook(JobHook):
    """Periodic preview images of a run, with the LoRA as trained so far, saved as PNGs under
    `folder` and reported as "sample" events; also once at the last step of a run that finishes.

    That one is made inside the training session too, as the others: the LoRA attached, and swapped
    blocks still swapped (after the session ComfyUI would load the whole model for the sampler: Flux
    fp8 on 8 and 12 GB cards ran out of memory there, bench/RESULTS.md)."""

    at_last_step = True

    def __init__(self, vae, encoded: EncodedPrompts, settings: SampleSettings, every: int, folder: str | Path,
                 clip=None):
        self.vae = vae
        self.encoded = encoded
        # Where the run trains text encoders, the prompts are encoded again at each preview through them.
        self.clip = clip
        self.settings = settings
        self.every = every
        self.folder = Path(folder)

    def on_step(self, trainer) -> list[Event]:
        encoded = self.encoded
        if self.clip is not None and trainer.text_encoding is not None:
            encoded = encode_prompts(self.clip, self.settings, trainer.text_encoding)
        keep_graphs = self._room_beside_graphs(trainer)
        if not keep_graphs:
            # The recorded steps' memory (a step's activations) is the sampler's and the VAE's while they run.
            trainer.release_graphs()
        try:
            images = self._sample(trainer, encoded, keep_graphs)
        except comfy.model_management.InterruptProcessingException:
            # ComfyUI's Cancel reached the sampler first, which cleared the flag on its way out.
            # Raise it again, so whoever watches the run cancels it the usual way (and saves).
            comfy.model_management.interrupt_current_processing(True)
            return []
        finally:
            # The VAE was loaded for decoding only: training gets its memory back, and the sampler's
            # scratch memory with it (unload_models empties the allocator's cache).
            comfy_compat.unload_models([self.vae.patcher])
        # Sampling may have moved the model off the device to make room for the VAE. The sampler
        # loaded the trained patcher itself, not a clone, so ComfyUI holds the model once.
        trainer.reload_model()
        step = trainer.state.step
        self.folder.mkdir(parents=True, exist_ok=True)
        files = []
        for index, image in enumerate(images):
            path = self.folder / f"step{step:06d}_{index:02d}.png"
            Image.fromarray((image.cpu().numpy() * 255).round().astype("uint8")).save(path)
            files.append(str(path))
        prompts = list(self.settings.prompts)
        return [Event("sample", {"step": step, "images": images, "files": files, "prompts": prompts})]

    def _room_beside_graphs(self, trainer) -> bool:
        """Whether the recorded steps keep their memory through this preview: where the card has room for the
        preview outside it, they replay right after it instead of each bucket recording again (about a
        second each for SDXL, bench/NOTES.md §18)."""
        if not trainer.holds_graphs:
            return False
        needed = preview_memory(trainer.patcher, self.vae, self.settings)
        unclaimed = comfy_compat.device_memory_unclaimed(trainer.device)
        keep = unclaimed >= needed
        log.info("the preview needs about %.2f GiB free and %.2f GiB are: the recorded training steps %s",
                 needed / 2**30, unclaimed / 2**30,
                 "keep their memory" if keep else "give theirs to it and record again after it")
        return keep

    def _sample(self, trainer, encoded: EncodedPrompts, beside_graphs: bool) -> torch.Tensor:
        try:
            # With EMA on, previews show the average, as the saved LoRA will be.
            with ema_weights(trainer):
                return sample_images(trainer.patcher, self.vae, encoded, self.settings)
        except torch.OutOfMemoryError:
            if not beside_graphs:
                raise
            log.warning("out of GPU memory previewing beside the recorded training steps; they give their memory "
                        "to the preview, which starts again")
        # Outside the handler: its traceback would keep the failed attempt's memory.
        trainer.release_graphs()
        return self._sample(trainer, encoded, beside_graphs=False)
