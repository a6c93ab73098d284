r"""The dataset: images and captions from a folder, aspect-ratio buckets, and the cached latents and
text embeddings the trainer trains on.

A dataset folder holds png/jpg/jpeg/webp images, each with an optional same-name caption file;
images in kohya-style `N_name` subfolders count N times per epoch. Every image is resized to cover
its bucket and centre-cropped; buckets have sides that are multiples of 64 and an area just under
resolution², and an image goes to the bucket nearest its aspect ratio.

What the trainer receives is fixed once encoded, so randomness is precomputed:
- Flip: every image also gives a mirrored sample with its own latents. An epoch shows both, which
  is what a random 50 % flip gives in expectation, and both latents are encoded once.
- Tag shuffling: each caption gets up to `shuffle_variants` tag orders (the written order first,
  then seeded shuffles that keep the first `keep_tags` tags in place), drawn with equal
  probability. Caption dropout adds the empty caption, drawn with probability `caption_dropout`.
- Equal shapes: the trainer stacks conditionings into batches, so every caption of a dataset is
  encoded at one token length per text-encoder stream. CLIP streams (77-token chunks) repeat their
  chunks up to the least common multiple of the dataset's chunk counts: ComfyUI pads conds the same
  way to batch them, and for cross-attention (SDXL) the result is unchanged. Captions longer than
  MAX_CHUNKS chunks are cut. T5 streams are padded with T5's pad token to the longest caption,
  which is what ComfyUI's own minimum-length padding does.

Captions are tokenized by the CLIP object, so ComfyUI's prompt syntax applies as in CLIPTextEncode:
`(word:1.2)` weights a word; write `\(` for a literal parenthesis.

Both caches are content-addressed safetensors files under `<cache_dir>/latents/` and `<cache_dir>/text/`,
reused across runs: latents by image bytes, bucket, flip and VAE; embeddings by the exact token ids
and weights and the text encoder. They hold the VAE's and text encoders' raw outputs, so one cache
serves every family and bucket: ComfyUI's latent format and the family's conditioning are applied
after loading. Entries are never deleted; removing the folder is safe.

Each entry's header records its own name, the tensors it must hold and a hash of their content; an
entry that does not match (damaged bytes, another entry's file, a missing tensor, a folder in its
place, an unreadable file) is computed again and rewritten, with a warning naming it. Nothing of a
caption's text is stored: its entry is named by a hash of its tokens and logged by a hash of its text.
"""

import hashlib
import json
import logging
import math
import os
import random
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import comfy.model_management
import comfy.utils
import numpy as np
import safetensors
import safetensors.torch
import torch
from PIL import ExifTags, Image, ImageOps

from . import comfy_compat
from .config import ConfigError, DatasetFacts, TrainConfig, _require
from .export import write_safetensors_atomic
from .families import family_for
from .trainer import Sample

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
REPEAT_FOLDER = re.compile(r"(\d+)_(.+)")
BUCKET_STEP = 64
# CLIP splits long captions into 77-token chunks; 3 (225 tokens) is the longest kohya trains on.
MAX_CHUNKS = 3
DEFAULT_CACHE_FOLDER = "lora_trainer_cache"
# Bump when what a cache entry holds, or how it is computed, changes.
CACHE_VERSION = 2
# Values sampled from each weight tensor for a model's fingerprint.
FINGERPRINT_SAMPLES = 64
# EXIF orientations that turn the image by 90 degrees, swapping width and height.
TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)


class DatasetError(ValueError):
    """The dataset cannot be built from these files or models; the message says what to fix."""


@dataclass(frozen=True)
class DatasetConfig:
    """A dataset folder and how its images and captions become training samples."""

    folder: str = ""  # absolute, or relative to ComfyUI's input folder
    caption_extension: str = "txt"
    default_caption: str = ""  # for images without a caption file (or with an empty one)
    trigger_word: str = ""  # prepended to captions that do not contain it
    caption_dropout: float = 0.0
    shuffle_tags: bool = False  # captions are comma-separated tags
    keep_tags: int = 0  # leading tags that stay in place when shuffling
    shuffle_variants: int = 4  # tag orders encoded per caption
    flip: bool = False
    resolution: int = 1024
    min_bucket_side: int = 0  # 0: resolution / 2, at least 64
    max_bucket_side: int = 0  # 0: 2 * resolution
    seed: int = 0  # of the tag shuffles
    cache_dir: str = ""  # absolute, or relative to ComfyUI's output folder; "": `lora_trainer_cache` there

    def __post_init__(self):
        owner = "dataset"
        _require(self.folder.strip() != "", owner, "folder", "is empty; give the folder that holds the images")
        _require(self.caption_extension.lstrip(".") != "", owner, "caption_extension", "is empty; use e.g. 'txt'")
        _require(0.0 <= self.caption_dropout < 1.0, owner, "caption_dropout",
                 f"must be in [0, 1), got {self.caption_dropout!r}")
        for name, least in (("keep_tags", 0), ("shuffle_variants", 1), ("resolution", BUCKET_STEP),
                            ("min_bucket_side", 0), ("max_bucket_side", 0)):
            value = getattr(self, name)
            _require(isinstance(value, int) and value >= least, owner, name,
                     f"must be an integer >= {least}, got {value!r}")
        for name in ("resolution", "min_bucket_side", "max_bucket_side"):
            value = getattr(self, name)
            _require(value % BUCKET_STEP == 0, owner, name, f"must be a multiple of {BUCKET_STEP}, got {value}")
        smallest, largest = self.bucket_bounds
        _require(smallest <= self.resolution, owner, "min_bucket_side",
                 f"{smallest} is above the resolution {self.resolution}")
        _require(largest >= self.resolution, owner, "max_bucket_side",
                 f"{largest} is below the resolution {self.resolution}")

    @property
    def bucket_bounds(self) -> tuple[int, int]:
        """The smallest and largest bucket side."""
        half = max(BUCKET_STEP, self.resolution // 2 // BUCKET_STEP * BUCKET_STEP)
        return self.min_bucket_side or half, self.max_bucket_side or 2 * self.resolution


@dataclass(frozen=True)
class ImageEntry:
    """One image file of a dataset."""

    path: Path
    name: str  # the path relative to the dataset folder, with '/'
    repeats: int
    caption: str  # the caption file's text, or the default caption
    size: tuple[int, int]  # (width, height) as displayed, EXIF orientation applied


@dataclass
class DatasetReport:
    folder: Path
    cache_dir: Path
    images: int = 0
    samples: int = 0  # per epoch: images x repeats, x 2 with flip
    buckets: dict[tuple[int, int], int] = field(default_factory=dict)  # (width, height) -> samples
    latents_cached: int = 0
    latents_encoded: int = 0
    captions_cached: int = 0
    captions_encoded: int = 0
    # Sample key -> (probability, caption text) of every conditioning the sample may draw.
    captions: dict[str, list[tuple[float, str]]] = field(default_factory=dict)
    train_images: int = 0  # images x repeats (kohya's count: flips not doubled)
    resolution: int = 0
    tag_frequency: dict[str, dict[str, int]] = field(default_factory=dict)  # see tag_frequency()

    def facts(self) -> DatasetFacts:
        """What the LoRA file's metadata records of this dataset."""
        return DatasetFacts(self.tag_frequency, self.train_images, self.resolution)

    def summary(self) -> str:
        buckets = ", ".join(f"{w}x{h}: {n}" for (w, h), n in sorted(self.buckets.items()))
        return (f"{self.images} images, {self.samples} samples per epoch (buckets {buckets}); "
                f"latents {self.latents_cached} cached, {self.latents_encoded} encoded; "
                f"captions {self.captions_cached} cached, {self.captions_encoded} encoded")


# -- the folder ----------------------------------------------------------------------------------


def resolve_folder(folder: str, input_dir: str | os.PathLike) -> Path:
    """The dataset folder: `folder` if absolute, else inside ComfyUI's input folder `input_dir`."""
    given = Path(folder.strip()).expanduser()
    path = Path(input_dir) / given  # an absolute `given` replaces input_dir
    if not path.is_dir():
        where = "" if given.is_absolute() else f" (relative folders are looked up in {input_dir})"
        raise ConfigError(f"dataset.folder: {path} is not a folder{where}")
    return path


def scan(folder: Path, config: DatasetConfig) -> list[ImageEntry]:
    """The images of `folder` (once each) and of its `N_name` subfolders (N times each), sorted by name."""
    sources = [(folder, 1)]
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        match = REPEAT_FOLDER.fullmatch(sub.name)
        if match and int(match[1]) >= 1:
            sources.append((sub, int(match[1])))
        else:
            log.warning("dataset: skipping subfolder %s: only N_name subfolders (N >= 1 repeats) are read", sub)
    entries = [
        _entry(path, folder, repeats, config)
        for source, repeats in sources
        for path in sorted(source.iterdir())
        if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()
    ]
    if not entries:
        kinds = ", ".join(s.lstrip(".") for s in IMAGE_SUFFIXES)
        raise ConfigError(f"dataset.folder: {folder} holds no images ({kinds}), nor do N_name subfolders in it")
    return entries


def _entry(path: Path, folder: Path, repeats: int, config: DatasetConfig) -> ImageEntry:
    caption_path = path.with_suffix("." + config.caption_extension.lstrip("."))
    caption = ""
    if caption_path.is_file():
        try:
            caption = caption_path.read_text(encoding="utf-8-sig").strip()
        except (OSError, UnicodeDecodeError) as error:
            raise DatasetError(f"{caption_path}: cannot be read as UTF-8 text ({error}); fix or remove it") from None
    try:
        # Opening reads only the header: sizes come cheap, pixels are decoded when encoding.
        with Image.open(path) as image:
            width, height = image.size
            if image.getexif().get(ExifTags.Base.Orientation, 1) in TRANSPOSING_ORIENTATIONS:
                width, height = height, width
    except (OSError, Image.DecompressionBombError) as error:
        raise DatasetError(f"{path}: cannot be read as an image ({error}); replace or remove it") from None
    name = path.relative_to(folder).as_posix()
    return ImageEntry(path, name, repeats, caption or config.default_caption, (width, height))


# -- buckets and pixels --------------------------------------------------------------------------


def bucket_sizes(resolution: int, min_side: int, max_side: int) -> list[tuple[int, int]]:
    """(width, height) pairs with sides multiples of 64 in [min_side, max_side]: for each width, the
    largest height that keeps the area within resolution², and the same turned by 90 degrees."""
    area = resolution * resolution
    sizes = set()
    for width in range(min_side, max_side + 1, BUCKET_STEP):
        height = area // width // BUCKET_STEP * BUCKET_STEP
        if min_side <= height <= max_side:
            sizes.update({(width, height), (height, width)})
    return sorted(sizes)


def nearest_bucket(size: tuple[int, int], buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is nearest (in log scale) to that of `size`; the larger on a tie."""
    ratio = math.log(size[0] / size[1])
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - ratio), -b[0] * b[1]))


def load_pixels(path: Path, bucket: tuple[int, int], flip: bool) -> torch.Tensor:
    """The image as ComfyUI's IMAGE (1, H, W, 3), floats in [0, 1]: EXIF orientation applied,
    resized to cover the bucket (width, height), centre-cropped, mirrored if `flip`."""
    try:
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image)
            if image.mode == "I":  # 16-bit: scaled to 8 bits as ComfyUI's LoadImage does
                image = image.point(lambda value: value * (1 / 255))
            image = image.convert("RGB")
    except (OSError, Image.DecompressionBombError) as error:
        raise DatasetError(f"{path}: cannot be read as an image ({error}); replace or remove it") from None
    image = ImageOps.fit(image, bucket, Image.Resampling.LANCZOS)
    if flip:
        image = ImageOps.mirror(image)
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).unsqueeze(0)


# -- captions ------------------------------------------------------------------------------------


def caption_variants(caption: str, config: DatasetConfig, seed_key: str) -> list[str]:
    """The distinct caption texts a sample trains on: the written tag order first, then up to
    `shuffle_variants - 1` seeded shuffles (same `seed_key`, same shuffles) that keep the first
    `keep_tags` tags in place. The trigger word goes in front of each where the caption lacks it."""
    texts = [caption]
    if config.shuffle_tags:
        tags = [tag.strip() for tag in caption.split(",") if tag.strip()]
        kept, rest = tags[: config.keep_tags], tags[config.keep_tags :]
        texts = [", ".join(tags)]
        rng = random.Random(f"{config.seed}:{seed_key}")
        for _ in range(config.shuffle_variants - 1):
            rng.shuffle(rest)
            text = ", ".join(kept + rest)
            if text not in texts:
                texts.append(text)
    trigger = config.trigger_word.strip()
    if trigger and not re.search(rf"(?<!\w){re.escape(trigger)}(?!\w)", caption, re.IGNORECASE):
        texts = [f"{trigger}, {text}" if text else trigger for text in texts]
    return texts


def tag_frequency(entries: list[ImageEntry], config: DatasetConfig, folder: Path) -> dict[str, dict[str, int]]:
    """kohya's `ss_tag_frequency`, which A1111 / Forge show as a LoRA's tags: per folder (the dataset
    folder's name for its own images, an N_name subfolder's name for its), how many captions hold each
    comma-separated tag, lower-cased. Each image counts once, whatever its repeats, with its caption as
    trained in the written order (the trigger word included)."""
    counts: dict[str, dict[str, int]] = {}
    for entry in entries:
        frequency = counts.setdefault(entry.name.rpartition("/")[0] or folder.name, {})
        for tag in caption_variants(entry.caption, config, entry.name)[0].split(","):
            tag = tag.strip().lower()
            if tag:
                frequency[tag] = frequency.get(tag, 0) + 1
    return counts


def caption_choices(variants: list[str], config: DatasetConfig) -> list[tuple[float, str]]:
    """(probability, caption text) of every caption a sample may train on: the variants equally
    likely, and the empty caption with the probability of caption dropout."""
    share = (1.0 - config.caption_dropout) / len(variants)
    dropped = [(config.caption_dropout, "")] if config.caption_dropout > 0 else []
    return [(share, text) for text in variants] + dropped


def equal_length_tokens(tokenized: dict[str, dict], empty: dict) -> dict[str, dict]:
    """Tokens of every text brought to one length per stream (see the module docstring). `tokenized`
    maps texts to `CLIP.tokenize` output ({stream: [chunk of (token, weight)]}); `empty` is the
    tokenized empty caption, whose last token is each stream's pad token."""
    result: dict[str, dict] = {text: {} for text in tokenized}
    for stream, empty_chunks in empty.items():
        pad = empty_chunks[-1][-1]
        chunk_lists = {}
        for text, tokens in tokenized.items():
            if len(tokens[stream]) > MAX_CHUNKS:
                log.warning("dataset: caption cut to %d chunks of %d tokens: %r", MAX_CHUNKS,
                            len(tokens[stream][0]), text[:80])
            chunk_lists[text] = tokens[stream][:MAX_CHUNKS]
        chunk_count = math.lcm(*(len(chunks) for chunks in chunk_lists.values()))
        length = max(len(chunk) for chunks in chunk_lists.values() for chunk in chunks)
        for text, chunks in chunk_lists.items():
            repeated = chunks * (chunk_count // len(chunks))
            result[text][stream] = [list(chunk) + [pad] * (length - len(chunk)) for chunk in repeated]
    return result


# -- the cache -----------------------------------------------------------------------------------


def model_fingerprint(module: torch.nn.Module, *extra) -> str:
    """A cheap identity of a model that is stable across runs: its class, every tensor's name, shape
    and dtype, and up to FINGERPRINT_SAMPLES evenly spaced values of each (training changes nearly
    every value of a tensor it touches), plus `extra` (settings that change the output)."""
    digest = hashlib.sha256(f"{type(module).__qualname__}{extra!r}".encode())
    for name, tensor in module.state_dict().items():
        flat = tensor.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // FINGERPRINT_SAMPLES)][:FINGERPRINT_SAMPLES]
        digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        digest.update(sample.cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def text_encoder_fingerprint(clip) -> str:
    # Patches (a LoRA on the text encoder) are told apart by their identity, which ComfyUI renews
    # whenever patches are added: reused within one ComfyUI session, recomputed after a restart.
    patches = str(clip.patcher.patches_uuid) if clip.patcher.patches else ""
    return model_fingerprint(clip.cond_stage_model, clip.layer_idx, patches)


class TensorCache:
    """Tensors in safetensors files named by the hash of a key, under one folder. An entry's header
    holds its name, its tensors' names and a hash of their content, checked on every read."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.hits = 0
        self.misses = 0

    def get(self, key: dict, compute: Callable[[], dict[str, torch.Tensor]], required: tuple[str, ...],
            label: str) -> dict[str, torch.Tensor]:
        """The tensors `required` stored under `key`, or those `compute()` returns, then stored. `label`
        names the entry in warnings."""
        name = hashlib.sha256(json.dumps({"version": CACHE_VERSION, **key}, sort_keys=True).encode()).hexdigest()
        path = self.folder / f"{name}.safetensors"
        if os.path.lexists(path):
            tensors, problem = _read_entry(path, name, required)
            if problem is None:
                self.hits += 1
                return tensors
            log.warning("dataset: cache entry %s (%s) %s; computing it again", path, label, problem)
            _clear_entry(path)
        tensors = {k: v.detach().cpu().contiguous() for k, v in compute().items()}
        metadata = {"entry": name, "tensors": ",".join(sorted(tensors)), "sha256": content_hash(tensors)}
        write_safetensors_atomic(path, tensors, metadata)
        self.misses += 1
        return tensors


def content_hash(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 of every tensor's name, dtype, shape and bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _read_entry(path: Path, name: str, required: tuple[str, ...]) -> tuple[dict[str, torch.Tensor], str | None]:
    """(tensors, None) of a sound entry; else ({}, what is wrong with it)."""
    if not path.is_file():
        return {}, "is not a file"
    try:
        with safetensors.safe_open(str(path), framework="pt") as file:
            metadata = file.metadata() or {}
            tensors = {key: file.get_tensor(key) for key in file.keys()}
    # What a damaged header raises varies with the damage (the library's own error, or a decoding
    # error of its JSON); each means the same here: the entry is not usable.
    except (OSError, ValueError, RuntimeError, safetensors.SafetensorError) as error:
        return {}, f"is unreadable ({error})"
    if metadata.get("entry") != name:
        return {}, "holds another entry's tensors, or has no integrity record"
    if sorted(tensors) != sorted(required) or metadata.get("tensors") != ",".join(sorted(required)):
        return {}, f"holds {', '.join(sorted(tensors)) or 'no tensors'}, not {', '.join(sorted(required))}"
    if metadata.get("sha256") != content_hash(tensors):
        return {}, "does not match its content hash (damaged)"
    return tensors, None


def _clear_entry(path: Path) -> None:
    """Removes what stands where an entry is written: a folder cannot be replaced by a file."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


# -- building samples ----------------------------------------------------------------------------


def build_samples(
    config: DatasetConfig,
    patcher,
    clip,
    vae,
    input_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
) -> tuple[list[Sample], DatasetReport]:
    """Training samples of the dataset for the model of `patcher` (a ComfyUI ModelPatcher), with
    latents from `vae` (comfy.sd.VAE) and conditioning from `clip` (comfy.sd.CLIP), read from the
    cache where present. The VAE and text encoders are off the GPU when this returns."""
    folder = resolve_folder(config.folder, input_dir)
    entries = scan(folder, config)
    cache_dir = Path(output_dir) / Path(config.cache_dir or DEFAULT_CACHE_FOLDER).expanduser()
    report = DatasetReport(folder, cache_dir, images=len(entries), train_images=sum(e.repeats for e in entries),
                           resolution=config.resolution, tag_frequency=tag_frequency(entries, config, folder))
    family = family_for(patcher.model, TrainConfig())
    model_channels = patcher.model.latent_format.latent_channels
    if vae.latent_channels != model_channels:
        raise DatasetError(f"the VAE gives {vae.latent_channels}-channel latents, the model takes {model_channels}: "
                           "connect the VAE that belongs to the model")
    buckets = bucket_sizes(config.resolution, *config.bucket_bounds)
    placed = [(entry, nearest_bucket(entry.size, buckets)) for entry in entries]
    flips = (False, True) if config.flip else (False,)
    choices = {e.name: caption_choices(caption_variants(e.caption, config, e.name), config) for e in entries}
    texts = sorted({text for drawn in choices.values() for _, text in drawn})
    latent_cache, text_cache = TensorCache(cache_dir / "latents"), TensorCache(cache_dir / "text")
    samples = []
    try:
        with torch.no_grad():
            progress = comfy.utils.ProgressBar(len(placed) * len(flips) + len(texts))
            raw_latents = _encode_images(vae, placed, flips, latent_cache, progress)
            embeddings = _encode_captions(clip, texts, text_cache, progress)
            for entry, bucket in placed:
                drawn = choices[entry.name]
                conditionings = [(p, family.conditioning(*embeddings[text], *bucket)) for p, text in drawn]
                for flip in flips:
                    latents = patcher.model.process_latent_in(raw_latents[entry.name, flip].unsqueeze(0))[0]
                    key = entry.name + (" (flipped)" if flip else "")
                    # Repeats list the same Sample object: the trainer moves its tensors to the device once.
                    samples += [Sample(latents, conditionings[0][1], key, conditionings[1:])] * entry.repeats
                    report.buckets[bucket] = report.buckets.get(bucket, 0) + entry.repeats
                    report.captions[key] = drawn
    finally:
        comfy_compat.unload_models([vae.patcher, clip.patcher])
    report.samples = len(samples)
    report.latents_cached, report.latents_encoded = latent_cache.hits, latent_cache.misses
    report.captions_cached, report.captions_encoded = text_cache.hits, text_cache.misses
    log.info("dataset %s: %s", folder, report.summary())
    return samples, report


def _encode_images(vae, placed, flips, cache: TensorCache, progress) -> dict[tuple[str, bool], torch.Tensor]:
    """Raw VAE latents (C, h, w) by (image name, flipped)."""
    vae_key = model_fingerprint(vae.first_stage_model)
    latents = {}
    for entry, bucket in placed:
        content = hashlib.sha256(entry.path.read_bytes()).hexdigest()
        for flip in flips:
            comfy.model_management.throw_exception_if_processing_interrupted()
            key = {"image": content, "bucket": bucket, "flip": flip, "vae": vae_key}

            def encode(entry=entry, bucket=bucket, flip=flip):
                return {"latents": vae.encode(load_pixels(entry.path, bucket, flip))[0]}

            latents[entry.name, flip] = cache.get(key, encode, ("latents",), entry.name)["latents"]
            progress.update(1)
    return latents


def _encode_captions(clip, texts: list[str], cache: TensorCache, progress) -> dict[str, tuple]:
    """(cond (1, T, D), pooled (1, P)) by caption text, T equal for all texts."""
    empty = clip.tokenize("")
    tokens = equal_length_tokens({text: clip.tokenize(text) for text in texts}, empty)
    encoder_key = text_encoder_fingerprint(clip)
    embeddings = {}
    for text in texts:
        comfy.model_management.throw_exception_if_processing_interrupted()

        def encode(text=text):
            cond, pooled = clip.encode_from_tokens(tokens[text], return_pooled=True)
            return {"cond": cond[0], "pooled": pooled[0]}

        label = f"caption sha256 {hashlib.sha256(text.encode()).hexdigest()[:16]}"
        stored = cache.get({"tokens": tokens[text], "encoder": encoder_key}, encode, ("cond", "pooled"), label)
        embeddings[text] = (stored["cond"].unsqueeze(0), stored["pooled"].unsqueeze(0))
        progress.update(1)
    return embeddings
