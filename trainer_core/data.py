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

Several datasets (`Datasets`) train together: each has its own folder, repeats (`repeats` times the
N_name folder's N), buckets, captions, masks and cache, and every sample of a dataset counts its repeats
in each epoch. All captions of all datasets are encoded at one token length, so samples of one bucket
batch together whichever dataset they come from.

Masks: with `mask_folder`, each image has a grey-scale mask of the same relative name and size (any
image suffix) there; with `alpha_mask`, the image's alpha channel is its mask (images without one train
whole); with both, their product. White (255) trains at full weight, black (0) not at all. The mask is
cropped and mirrored as its image, then averaged over each latent cell: the loss of a cell is weighted
by that average, and a cell whose pixels are all black contributes nothing (objective.py).

A regularisation dataset (`regularization`) trains the class without the trigger word, its loss times
`loss_weight`. Differential output preservation (`preservation_class`): every caption holding the
trigger word is also encoded with the trigger replaced by the class word, which the trainer uses to
hold the LoRA's prediction on the class to the base model's (objective.py).

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
import numbers
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
import torch.nn.functional as F
from PIL import ExifTags, Image, ImageChops, ImageOps

from . import comfy_compat
from .config import ConfigError, DatasetFacts, TrainConfig, _require
from .export import write_safetensors_atomic
from .families import family_for
from .objective import LOSS_MASK, LOSS_WEIGHT, PRESERVE, PRESERVE_WEIGHT
from .text_encoders import SIZE, TOKENS, WEIGHTS
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
# A larger loss multiplier is a typo: it would swamp every other dataset's gradient.
MAX_LOSS_WEIGHT = 100.0


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
    repeats: int = 1  # every image counts this many times per epoch (times its N_name folder's N)
    # Masks (module docstring): grey-scale images named as the dataset's images (any image suffix) in
    # this folder (absolute, or relative to ComfyUI's input folder), and/or the images' alpha channel.
    mask_folder: str = ""
    alpha_mask: bool = False
    regularization: bool = False  # trains the class without the trigger word (ai-toolkit's is_reg)
    loss_weight: float = 1.0  # multiplies the loss of this dataset's samples
    # Differential output preservation: the class word that replaces the trigger word (empty: off),
    # and the weight of the preservation term.
    preservation_class: str = ""
    preservation_weight: float = 1.0
    # A held-out set for the validation loss (validation.py): this fraction of the images, chosen by the
    # seed and left out of training; or the images of another folder (absolute, or in the input folder).
    validation_split: float = 0.0
    validation_folder: str = ""

    def __post_init__(self):
        owner = "dataset"
        _require(self.folder.strip() != "", owner, "folder", "is empty; give the folder that holds the images")
        _require(self.caption_extension.lstrip(".") != "", owner, "caption_extension", "is empty; use e.g. 'txt'")
        _require(0.0 <= self.caption_dropout < 1.0, owner, "caption_dropout",
                 f"must be in [0, 1), got {self.caption_dropout!r}")
        for name in ("loss_weight", "preservation_weight"):
            value = getattr(self, name)
            _require(isinstance(value, (int, float)) and math.isfinite(value) and 0 < value <= MAX_LOSS_WEIGHT,
                     owner, name, f"must be a number in (0, {MAX_LOSS_WEIGHT}], got {value!r}")
        _require(not (self.regularization and self.trigger_word.strip()), owner, "trigger_word",
                 "a regularisation dataset trains its class without the trigger word: leave it empty there")
        _require(not (self.regularization and self.preservation_class.strip()), owner, "preservation_class",
                 "a regularisation dataset has no trigger word to replace: leave it empty there")
        _require(not (self.preservation_class.strip() and not self.trigger_word.strip()), owner, "preservation_class",
                 "differential output preservation replaces the trigger word by the class word: give the "
                 "dataset's trigger_word too")
        for name, least in (("keep_tags", 0), ("shuffle_variants", 1), ("resolution", BUCKET_STEP),
                            ("min_bucket_side", 0), ("max_bucket_side", 0), ("repeats", 1)):
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
        split = self.validation_split
        _require(isinstance(split, (int, float)) and not isinstance(split, bool) and 0.0 <= split <= 0.5, owner,
                 "validation_split", f"must be a fraction in [0, 0.5] of the images held out (0: none), got {split!r}")
        _require(not (split and self.validation_folder.strip()), owner, "validation_split",
                 "is set together with validation_folder: hold out a fraction or give a folder, not both")

    @property
    def bucket_bounds(self) -> tuple[int, int]:
        """The smallest and largest bucket side."""
        half = max(BUCKET_STEP, self.resolution // 2 // BUCKET_STEP * BUCKET_STEP)
        return self.min_bucket_side or half, self.max_bucket_side or 2 * self.resolution


@dataclass(frozen=True)
class Datasets:
    """Several datasets trained together (chained Dataset nodes, the YAML file's `datasets:` list). Each
    keeps its own folder, repeats, buckets, captions, masks and cache; batches still come from one bucket,
    and each dataset's share of an epoch is its images times their repeats."""

    members: tuple[DatasetConfig, ...]

    def __post_init__(self):
        _require(len(self.members) > 0, "dataset", "folder", "no dataset given; connect a Dataset node")

    @classmethod
    def of(cls, value: "DatasetConfig | Datasets") -> "Datasets":
        return value if isinstance(value, Datasets) else cls((value,))

    def plus(self, config: DatasetConfig) -> "Datasets":
        return Datasets((*self.members, config))

    @property
    def trigger_word(self) -> str:
        """The trigger word the LoRA file records: the first dataset's that has one."""
        return next((c.trigger_word.strip() for c in self.members if c.trigger_word.strip()), "")


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
    masked: int = 0  # samples per epoch whose loss a mask weights
    # Caption -> the class-word caption differential output preservation trains on beside it.
    preserved: dict[str, str] = field(default_factory=dict)
    # The held-out samples of the validation loss: one per image, its caption as written, no flip, no loss terms.
    validation: list[Sample] = field(default_factory=list)

    def facts(self) -> DatasetFacts:
        """What the LoRA file's metadata records of this dataset."""
        return DatasetFacts(self.tag_frequency, self.train_images, self.resolution)

    def summary(self) -> str:
        buckets = ", ".join(f"{w}x{h}: {n}" for (w, h), n in sorted(self.buckets.items()))
        masked = f", {self.masked} masked" if self.masked else ""
        return (f"{self.images} images, {self.samples} samples per epoch{masked} (buckets {buckets}); "
                f"latents {self.latents_cached} cached, {self.latents_encoded} encoded; "
                f"captions {self.captions_cached} cached, {self.captions_encoded} encoded")

    @classmethod
    def merged(cls, parts: list["DatasetReport"]) -> "DatasetReport":
        """One report of several datasets: counts added up, the first dataset's folders, the largest
        resolution, tag counts of folders of the same name added up."""
        if len(parts) == 1:
            return parts[0]
        report = cls(parts[0].folder, parts[0].cache_dir, resolution=max(p.resolution for p in parts))
        for part in parts:
            for name in ("images", "samples", "latents_cached", "latents_encoded", "captions_cached",
                         "captions_encoded", "train_images", "masked"):
                setattr(report, name, getattr(report, name) + getattr(part, name))
            for bucket, count in part.buckets.items():
                report.buckets[bucket] = report.buckets.get(bucket, 0) + count
            report.captions |= part.captions
            report.preserved |= part.preserved
            report.validation += part.validation
            for folder, counts in part.tag_frequency.items():
                merged = report.tag_frequency.setdefault(folder, {})
                for tag, count in counts.items():
                    merged[tag] = merged.get(tag, 0) + count
        return report


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
        _entry(path, folder, repeats * config.repeats, config)
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


# -- masks and preservation captions -------------------------------------------------------------


def mask_file(entry: ImageEntry, mask_dir: Path) -> Path:
    """The mask of an image: the file of the same relative name, with any image suffix, in `mask_dir`."""
    stem = mask_dir / entry.name
    for suffix in IMAGE_SUFFIXES:
        for candidate in (stem.with_suffix(suffix), stem.with_suffix(suffix.upper())):
            if candidate.is_file():
                return candidate
    raise DatasetError(f"dataset.mask_folder: {entry.path} has no mask: add {stem.with_suffix('.png')} (white trains, "
                       "black is left out), or train this image in a dataset without masks")


def pixel_mask(entry: ImageEntry, config: DatasetConfig, mask_dir: Path | None) -> Image.Image | None:
    """The image's mask at its displayed size, as 8-bit grey (255: full weight, 0: left out): the mask
    file's grey values, times the alpha channel with `alpha_mask`. None where neither applies."""
    layers = []
    if mask_dir is not None:
        path = mask_file(entry, mask_dir)
        try:
            with Image.open(path) as image:
                layers.append(ImageOps.exif_transpose(image).convert("L"))
        except (OSError, Image.DecompressionBombError) as error:
            raise DatasetError(f"{path}: cannot be read as a mask image ({error}); replace or remove it") from None
        if layers[0].size != entry.size:
            raise DatasetError(f"{path}: the mask is {layers[0].size[0]}x{layers[0].size[1]}, its image {entry.path} "
                               f"is {entry.size[0]}x{entry.size[1]}: give a mask of the image's size")
    if config.alpha_mask:
        with Image.open(entry.path) as image:
            image = ImageOps.exif_transpose(image)
            if image.has_transparency_data:
                layers.append(image.convert("RGBA").getchannel("A"))
    if not layers:
        return None
    return layers[0] if len(layers) == 1 else ImageChops.multiply(*layers)


def latent_mask(mask: Image.Image, bucket: tuple[int, int], flip: bool, latent_hw: tuple[int, int],
                label: str) -> torch.Tensor:
    """The mask cropped and mirrored as its image is (load_pixels), averaged over each latent cell:
    (1, h, w) weights in [0, 1]; a cell whose pixels are all black is exactly 0."""
    mask = ImageOps.fit(mask, bucket, Image.Resampling.BILINEAR)
    if flip:
        mask = ImageOps.mirror(mask)
    pixels = torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255.0)[None, None]
    weights = F.interpolate(pixels, size=latent_hw, mode="area")[0]
    if not bool(weights.any()):
        raise DatasetError(f"{label}: its mask is black everywhere in the training crop, so it would train nothing: "
                           "paint what should be learned white, or remove the image")
    return weights


def preservation_caption(text: str, trigger: str, class_word: str) -> str | None:
    """`text` with every whole-word trigger replaced by the class word; None where it lacks the trigger."""
    pattern = re.compile(rf"(?<!\w){re.escape(trigger.strip())}(?!\w)", re.IGNORECASE)
    if not pattern.search(text):
        return None
    return pattern.sub(lambda _: class_word.strip(), text)


# -- building samples ----------------------------------------------------------------------------


@dataclass
class _Plan:
    """One dataset's images, buckets and captions, read before anything is encoded."""

    index: int
    config: DatasetConfig
    placed: list[tuple[ImageEntry, tuple[int, int]]]
    flips: tuple[bool, ...]
    choices: dict[str, list[tuple[float, str]]]  # image name -> (probability, caption)
    preserved: dict[str, tuple[str, float]]  # caption -> (class-word caption, weight) for captions with the trigger
    mask_dir: Path | None
    report: DatasetReport
    held_out: list[tuple[ImageEntry, tuple[int, int]]]  # the validation loss's images, not trained on
    held_out_texts: dict[str, str]  # held-out image name -> its caption as written

    @property
    def texts(self) -> set[str]:
        return {text for drawn in self.choices.values() for _, text in drawn} | {
            text for text, _ in self.preserved.values()} | set(self.held_out_texts.values())

    def key(self, name: str) -> str:
        """A sample's key: its image's name, after the first dataset prefixed with the dataset's number."""
        return name if self.index == 0 else f"dataset {self.index + 1}: {name}"


def _plan(index: int, config: DatasetConfig, input_dir, output_dir) -> _Plan:
    folder = resolve_folder(config.folder, input_dir)
    mask_dir = None
    if config.mask_folder.strip():
        mask_dir = Path(input_dir) / Path(config.mask_folder.strip()).expanduser()
        if not mask_dir.is_dir():
            raise ConfigError(f"dataset.mask_folder: {mask_dir} is not a folder")
    entries, held_out = held_out_entries(scan(folder, config), config, input_dir)
    cache_dir = Path(output_dir) / Path(config.cache_dir or DEFAULT_CACHE_FOLDER).expanduser()
    trained = not config.regularization  # kohya's counts and tags are of the trained images, not the class's
    report = DatasetReport(folder, cache_dir, images=len(entries),
                           train_images=sum(e.repeats for e in entries) if trained else 0,
                           resolution=config.resolution,
                           tag_frequency=tag_frequency(entries, config, folder) if trained else {})
    buckets = bucket_sizes(config.resolution, *config.bucket_bounds)
    choices = {e.name: caption_choices(caption_variants(e.caption, config, e.name), config) for e in entries}
    preserved = {}
    if config.preservation_class.strip():
        for text in {text for drawn in choices.values() for _, text in drawn}:
            replaced = preservation_caption(text, config.trigger_word, config.preservation_class)
            if replaced is not None:
                preserved[text] = (replaced, config.preservation_weight)
    return _Plan(index, config, [(e, nearest_bucket(e.size, buckets)) for e in entries],
                 (False, True) if config.flip else (False,), choices, preserved, mask_dir, report,
                 [(e, nearest_bucket(e.size, buckets)) for e in held_out],
                 {e.name: caption_variants(e.caption, config, e.name)[0] for e in held_out})


def held_out_entries(entries: list[ImageEntry], config: DatasetConfig,
                     input_dir: str | os.PathLike) -> tuple[list[ImageEntry], list[ImageEntry]]:
    """(training images, held-out images of the validation loss). `validation_folder`'s images are held out
    as they are; `validation_split` holds out that fraction of the dataset's images (at least one, chosen by
    the seed, every repeat of an image with it), which then are not trained on."""
    if config.validation_folder.strip():
        try:
            return entries, scan(resolve_folder(config.validation_folder, input_dir), config)
        except ConfigError as error:
            raise ConfigError(str(error).replace("dataset.folder:", "dataset.validation_folder:", 1)) from None
    if not config.validation_split:
        return entries, []
    count = max(1, round(len(entries) * config.validation_split))
    if count >= len(entries):
        raise ConfigError(f"dataset.validation_split: holding out {count} of the dataset's {len(entries)} images "
                          "leaves none to train on; add images, lower it or give a validation_folder")
    chosen = set(random.Random(f"validation:{config.seed}").sample([e.name for e in entries], count))
    return [e for e in entries if e.name not in chosen], [e for e in entries if e.name in chosen]


def build_samples(
    datasets: DatasetConfig | Datasets,
    patcher,
    clip,
    vae,
    input_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    train_text_encoders: bool = False,
) -> tuple[list[Sample], DatasetReport]:
    """Training samples of the dataset(s) for the model of `patcher` (a ComfyUI ModelPatcher), with
    latents from `vae` (comfy.sd.VAE) and conditioning from `clip` (comfy.sd.CLIP), read from each
    dataset's cache where present. Every caption of every dataset (and the class-word captions of
    differential output preservation) is encoded at one token length, so any two samples of a bucket
    batch together. The VAE and text encoders are off the GPU when this returns.

    With `train_text_encoders`, a sample's conditioning holds its caption's tokens and its bucket size
    (`caption_token_tensors`) instead of embeddings: the run encodes them while it trains the encoders."""
    family = family_for(patcher.model, TrainConfig())
    model_channels = patcher.model.latent_format.latent_channels
    if vae.latent_channels != model_channels:
        raise DatasetError(f"the VAE gives {vae.latent_channels}-channel latents, the model takes {model_channels}: "
                           "connect the VAE that belongs to the model")
    plans = [_plan(index, config, input_dir, output_dir) for index, config in enumerate(Datasets.of(datasets).members)]
    texts = sorted(set().union(*(plan.texts for plan in plans)))
    if train_text_encoders and any(plan.preserved for plan in plans):
        raise DatasetError("differential output preservation cannot be combined with training the text encoders "
                           "yet: turn train.diff_output_preservation (the Dataset's preservation class) off, or "
                           "set lora.text_encoders to 'none'")
    samples = []
    try:
        with torch.no_grad():
            images = sum(len(p.placed) * len(p.flips) + len(p.held_out) for p in plans)
            progress = comfy.utils.ProgressBar(images + len(texts))
            tokens = equal_length_tokens({text: clip.tokenize(text) for text in texts}, clip.tokenize(""))
            embeddings: dict[str, tuple] = {}
            token_tensors = None
            if train_text_encoders:
                token_tensors = caption_token_tensors(tokens)
                progress.update(len(texts))
            else:
                encoder_key = text_encoder_fingerprint(clip)
                for plan in plans:
                    new = [text for text in sorted(plan.texts) if text not in embeddings]
                    embeddings |= _encode_captions(clip, new, tokens, encoder_key, plan, progress)
            assemble = _SampleAssembly(patcher, family, embeddings, plans, token_tensors)
            for plan in plans:
                raw_latents = _encode_images(vae, plan.placed, plan.flips, plan, progress)
                samples += assemble.samples(plan, raw_latents)
                held_out_latents = _encode_images(vae, plan.held_out, (False,), plan, progress)
                plan.report.validation = assemble.held_out_samples(plan, held_out_latents)
    finally:
        comfy_compat.unload_models([vae.patcher, clip.patcher])
    for plan in plans:
        log.info("dataset %s: %s", plan.report.folder, plan.report.summary())
    return samples, DatasetReport.merged([plan.report for plan in plans])


class _SampleAssembly:
    """Samples of the encoded datasets, each conditioning with the loss terms of the run (objective.py):
    a mask where any dataset has masks (all ones for images without), a loss weight where any dataset's
    is not 1, and the class-word conditioning where any dataset preserves a class."""

    def __init__(self, patcher, family, embeddings: dict[str, tuple], plans: list[_Plan],
                 token_tensors: dict[str, dict[str, torch.Tensor]] | None = None):
        self.patcher = patcher
        self.family = family
        self.embeddings = embeddings
        # Where the run trains text encoders: each caption's tokens instead of its embeddings.
        self.token_tensors = token_tensors
        self.masks = any(p.mask_dir is not None or p.config.alpha_mask for p in plans)
        self.weights = any(p.config.loss_weight != 1.0 for p in plans)
        self.preserves = any(p.preserved for p in plans)
        # Samples share these tensors (the trainer moves each to the device once).
        self._conditionings: dict[tuple, dict[str, torch.Tensor]] = {}
        self._scalars: dict[float, torch.Tensor] = {}
        self._full_masks: dict[tuple[int, int], torch.Tensor] = {}

    def samples(self, plan: _Plan, raw_latents: dict) -> list[Sample]:
        samples = []
        for entry, bucket in plan.placed:
            drawn = plan.choices[entry.name]
            mask_image = pixel_mask(entry, plan.config, plan.mask_dir) if self.masks else None
            for flip in plan.flips:
                latents = self.patcher.model.process_latent_in(raw_latents[entry.name, flip].unsqueeze(0))[0]
                key = plan.key(entry.name) + (" (flipped)" if flip else "")
                mask = None
                if self.masks:
                    mask = (latent_mask(mask_image, bucket, flip, tuple(latents.shape[-2:]), key)
                            if mask_image is not None else self._full_mask(tuple(latents.shape[-2:])))
                conditionings = [(p, self._conditioning(plan, text, bucket, mask)) for p, text in drawn]
                # Repeats list the same Sample object: the trainer moves its tensors to the device once.
                samples += [Sample(latents, conditionings[0][1], key, conditionings[1:])] * entry.repeats
                plan.report.buckets[bucket] = plan.report.buckets.get(bucket, 0) + entry.repeats
                plan.report.captions[key] = drawn
                if mask is not None:
                    plan.report.masked += entry.repeats if mask_image is not None else 0
        plan.report.samples = len(samples)
        plan.report.preserved = {text: replaced for text, (replaced, _) in plan.preserved.items()}
        return samples

    def held_out_samples(self, plan: _Plan, raw_latents: dict) -> list[Sample]:
        """The validation loss's samples: the plain loss of each held-out image, so no loss terms."""
        return [Sample(self.patcher.model.process_latent_in(raw_latents[entry.name, False].unsqueeze(0))[0],
                       self._family_conditioning(plan.held_out_texts[entry.name], bucket), plan.key(entry.name))
                for entry, bucket in plan.held_out]

    def _conditioning(self, plan: _Plan, text: str, bucket, mask) -> dict[str, torch.Tensor]:
        conditioning = dict(self._family_conditioning(text, bucket))
        if mask is not None:
            conditioning[LOSS_MASK] = mask
        if self.weights:
            conditioning[LOSS_WEIGHT] = self._scalar(plan.config.loss_weight)
        if self.preserves:
            # Captions without the trigger word take part with weight 0 (their own caption stands in).
            replaced, weight = plan.preserved.get(text, (text, 0.0))
            conditioning |= {PRESERVE + k: v for k, v in self._family_conditioning(replaced, bucket).items()}
            conditioning[PRESERVE_WEIGHT] = self._scalar(weight)
        return conditioning

    def _family_conditioning(self, text: str, bucket) -> dict[str, torch.Tensor]:
        if (text, bucket) not in self._conditionings:
            if self.token_tensors is not None:
                self._conditionings[text, bucket] = {**self.token_tensors[text], SIZE: torch.tensor(bucket)}
            else:
                self._conditionings[text, bucket] = self.family.conditioning(*self.embeddings[text], *bucket)
        return self._conditionings[text, bucket]

    def _scalar(self, value: float) -> torch.Tensor:
        return self._scalars.setdefault(value, torch.tensor(float(value)))

    def _full_mask(self, latent_hw: tuple[int, int]) -> torch.Tensor:
        return self._full_masks.setdefault(latent_hw, torch.ones((1, *latent_hw)))


def _encode_images(vae, placed, flips, plan: _Plan, progress) -> dict[tuple[str, bool], torch.Tensor]:
    """Raw VAE latents (C, h, w) by (image name, flipped), from the dataset's cache where present."""
    vae_key = model_fingerprint(vae.first_stage_model)
    cache = TensorCache(plan.report.cache_dir / "latents")
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
    # Added up: a dataset's training images and its held-out ones are encoded in two calls.
    plan.report.latents_cached += cache.hits
    plan.report.latents_encoded += cache.misses
    return latents


def caption_token_tensors(tokens: dict[str, dict]) -> dict[str, dict[str, torch.Tensor]]:
    """Each caption's tokens (`equal_length_tokens` output) as a run that trains text encoders keeps them: per
    stream, token ids (chunks, length) and their weights, in float64 so that every weight comes back as the
    float ComfyUI parsed."""
    tensors = {}
    for text, streams in tokens.items():
        entry = {}
        for stream, chunks in streams.items():
            if not all(isinstance(pair[0], numbers.Integral) for chunk in chunks for pair in chunk):
                raise DatasetError(f"the caption {text[:80]!r} uses an embedding (textual inversion), which a run "
                                   "that trains the text encoders cannot encode: write it out in words")
            entry[TOKENS + stream] = torch.tensor([[pair[0] for pair in chunk] for chunk in chunks])
            entry[WEIGHTS + stream] = torch.tensor([[float(pair[1]) for pair in chunk] for chunk in chunks],
                                                   dtype=torch.float64)
        tensors[text] = entry
    return tensors


def _encode_captions(clip, texts: list[str], tokens: dict[str, dict], encoder_key: str, plan: _Plan,
                     progress) -> dict[str, tuple]:
    """(cond (1, T, D), pooled (1, P)) by caption text, from the dataset's cache where present."""
    cache = TensorCache(plan.report.cache_dir / "text")
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
    plan.report.captions_cached, plan.report.captions_encoded = cache.hits, cache.misses
    return embeddings
