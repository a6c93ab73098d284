"""LoRA files that ComfyUI's LoRA Loader reads as they are, checkpoints, and resuming from them.

A LoRA file holds, in the `comfyui` format (the default), kohya-style keys for every adapted layer:
`lora_unet_<module path inside diffusion_model, dots as underscores>` + `.lora_down.weight`,
`.lora_up.weight`, `.alpha`. ComfyUI scales each layer by alpha / rows of lora_down, which is the
training scale. The `diffusers` format names the layers as diffusers does (diffusers_format.py).
Its metadata holds kohya's `ss_*` keys, their hashes (`sshs_*`) and the model spec's `modelspec.*`.

A checkpoint is a folder `<output>/<name>/checkpoints/step-NNNNNN/` with the LoRA file at that
step (loadable as is) and the resume state: `resume.safetensors` holds every tensor (the fp32
LoRA weights, optimizer moments, RNG states), `resume.json` everything else, referring to those
tensors by name. Files and checkpoint folders appear only by rename, so a crash leaves a whole
one or none; unfinished ones are hidden dot-names ending in `.tmp`.
"""

import contextlib
import functools
import glob
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

import comfy.sd
import folder_paths
import safetensors
import safetensors.torch
import torch
from torch import nn

from . import comfy_compat, diffusers_format
from .config import ConfigError, DatasetFacts, LoraConfig, SaveConfig, TrainConfig, check_save_format
from .ema import ema_weights
from .families.base import Family
from .job import Event, JobHook
from .lora import LoraNetwork, lora_layer_for
from .text_encoders import DIFFUSERS_PREFIXES, ENCODER_NAMES, KOHYA_PREFIXES
from .trainer import Trainer

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None
    import msvcrt

log = logging.getLogger(__name__)

LORA_PREFIX = "lora_unet_"
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
RESUME_FORMAT = 1
CHECKPOINT_NAME = re.compile(r"step-(\d+)")
# Markers of the resume state's JSON skeleton (plain dict keys never start with "$").
TENSOR, TUPLE, ITEMS = "$tensor", "$tuple", "$items"


# -- the LoRA file ------------------------------------------------------------------------------


def kohya_name(module_path: str) -> str:
    """`input_blocks.4.1.proj_in` -> `lora_unet_input_blocks_4_1_proj_in`."""
    return LORA_PREFIX + module_path.replace(".", "_")


def lora_state_dict(network: LoraNetwork, dtype: str = "fp32", prefix: str = LORA_PREFIX) -> dict[str, torch.Tensor]:
    """The network in kohya's key layout (LyCORIS' suffixes for LoHa, LoKr and DoRA), on the CPU, weights
    in `dtype` ("fp16", "bf16", "fp32"); `prefix` is `lora_unet_` for the diffusion model, `lora_te1_` ... for
    a text encoder (text_encoders.KOHYA_PREFIXES).

    Tensors are copies: a consumer that keeps them (ComfyUI's patches) does not follow further training.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    tensors = {}
    for path, layer in network.items():
        name = prefix + path.replace(".", "_")
        if f"{name}.alpha" in tensors:
            raise ValueError(f"two layers, one of them {path!r}, have the same LoRA key {name!r}")
        for suffix, tensor in layer.file_tensors().items():
            tensors[f"{name}.{suffix}"] = tensor.to("cpu", DTYPES[dtype], copy=True).contiguous()
        # fp32 whatever the weights' dtype: alpha / rank is the scale, and bf16 would round e.g. 0.3.
        tensors[f"{name}.alpha"] = torch.tensor(layer.alpha, dtype=torch.float32)
    return tensors


def all_finite(parameters) -> bool:
    """Whether no weight of `parameters` (a network's, or Trainer.lora_parameters()) is NaN or infinite
    (one read from the device)."""
    if isinstance(parameters, nn.Module):
        parameters = parameters.parameters()
    return bool(torch.stack([p.detach().isfinite().all() for p in parameters]).all())


def lora_file_tensors(trainer: Trainer, save: SaveConfig) -> dict[str, torch.Tensor]:
    """The trained network, and the text encoders' where they train, in the key layout `save.format` names."""
    if save.format == "diffusers":
        check_save_format(trainer.lora_config, save)  # the nodes and lora-train check it before training
        tensors = diffusers_format.lora_state_dict(trainer.network, trainer.family, DTYPES[save.dtype])
        return tensors | text_encoder_diffusers_tensors(trainer, DTYPES[save.dtype])
    return lora_state_dict(trainer.network, save.dtype) | text_encoder_tensors(trainer, save.dtype)


def text_encoder_tensors(trainer: Trainer, dtype: str = "fp32") -> dict[str, torch.Tensor]:
    """The text encoders' LoRA in kohya's layout (`lora_te1_…` CLIP-L, `lora_te2_…` CLIP-G, `lora_te3_…`
    T5-XXL), as ComfyUI reads it; empty where no text encoder trains."""
    if trainer.text_encoding is None:
        return {}
    tensors = {}
    for encoder, network in trainer.text_encoding.loras.items():
        tensors |= lora_state_dict(network, dtype, KOHYA_PREFIXES[encoder])
    return tensors


def check_text_encoder_format(lora: LoraConfig, save: SaveConfig) -> None:
    """Raises ConfigError for a text encoder the save format cannot name (diffusers has no name of T5
    that ComfyUI maps); call it before training."""
    if save.format == "diffusers" and "t5xxl" in lora.trained_text_encoders:
        raise ConfigError("save.format: 'diffusers' has no key names of T5-XXL that ComfyUI loads; train "
                          "lora.text_encoders 'clip', or save in the 'comfyui' format")


def text_encoder_diffusers_tensors(trainer: Trainer, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The CLIP encoders' LoRA as diffusers' PEFT keys (`text_encoder.<module>.lora_A.weight` / `.lora_B.weight`,
    `text_encoder_2.` for CLIP-G); alpha / rank folded into B, as diffusers_format does for the backbone."""
    if trainer.text_encoding is None:
        return {}
    tensors = {}
    for encoder, network in trainer.text_encoding.loras.items():
        if encoder not in DIFFUSERS_PREFIXES:
            raise ConfigError(f"save.format: 'diffusers' has no key names of {ENCODER_NAMES[encoder]} that ComfyUI "
                              "loads; save in the 'comfyui' format")
        for path, layer in network.items():
            name = DIFFUSERS_PREFIXES[encoder] + path
            tensors[f"{name}.lora_A.weight"] = layer.down.detach().to("cpu", dtype, copy=True).contiguous()
            tensors[f"{name}.lora_B.weight"] = (layer.up.detach() * layer.scale).to("cpu", dtype).contiguous()
    return tensors


def lora_metadata(
    family: Family, lora: LoraConfig, train: TrainConfig, *, name: str, steps: int, started_at: float,
    trigger_word: str = "", dataset: DatasetFacts | None = None, saved_at: float | None = None,
    text_encoders: tuple[str, ...] = (),
) -> dict[str, str]:
    """The safetensors header: kohya's `ss_*` keys and the model spec's, which LoRA managers read;
    with `dataset`, also what the LoRA was trained on (tag frequencies, image count, resolution);
    `text_encoders`: the encoders whose LoRA the file holds (text_encoders.ENCODER_STREAMS' names)."""
    training_config = {"lora": asdict(lora), "train": train.to_dict()}
    saved = datetime.fromtimestamp(int(time.time() if saved_at is None else saved_at), timezone.utc)
    data = {}
    if dataset is not None:
        side = dataset.resolution
        data = {
            # kohya's own forms: JSON {folder: {tag: count}}, an int, and Python's text of a (width, height) tuple.
            "ss_tag_frequency": json.dumps(dataset.tag_frequency),
            "ss_num_train_images": str(dataset.num_train_images),
            "ss_resolution": str((side, side)),
            "modelspec.resolution": f"{side}x{side}",
        }
    return data | network_metadata(lora) | {
        "ss_network_dim": str(lora.rank),
        "ss_network_alpha": str(float(lora.alpha)),
        "ss_base_model_version": family.base_model_version,
        "ss_output_name": name,
        "ss_steps": str(steps),
        # kohya's learning-rate keys; 0 where no text encoder trained. Which encoders: ours, as Python's bool
        # text (kohya's style) and their names.
        "ss_learning_rate": str(train.learning_rate),
        "ss_unet_lr": str(train.learning_rate),
        "ss_text_encoder_lr": str(train.text_encoder_learning_rate if text_encoders else 0.0),
        "ss_train_text_encoder": str(bool(text_encoders)),
        "ss_text_encoders": ",".join(text_encoders),
        "ss_training_started_at": str(started_at),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": family.modelspec_architecture,
        "modelspec.title": name,
        "modelspec.trigger_phrase": trigger_word,
        "modelspec.date": saved.isoformat(),
        # `extra` may hold values JSON lacks; their text is enough for a record.
        "ss_training_config": json.dumps(training_config, sort_keys=True, default=str),
    }


def network_metadata(lora: LoraConfig) -> dict[str, str]:
    """kohya's `ss_network_module` and, for LyCORIS' algorithms, `ss_network_args` (JSON of strings, as
    kohya writes them): what LoRA managers read to tell the algorithm, and `load_lora_file` to rebuild it."""
    if lora.algorithm == "lora":
        return {"ss_network_module": "networks.lora"}
    args = {"algo": lora.algorithm}
    if lora.algorithm == "lokr":
        args |= {"factor": str(lora.lokr_factor), "full_matrix": str(lora.lokr_full_rank)}
    if lora.algorithm == "dora":
        # LyCORIS' DoRA is LoRA with weight decomposition, here on the input axis (lora.py's _Dora).
        args = {"algo": "lora", "dora_wd": "True", "wd_on_out": "False"}
    return {"ss_network_module": "lycoris.kohya", "ss_network_args": json.dumps(args)}


def kohya_hashes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict[str, str]:
    """`sshs_model_hash` and `sshs_legacy_hash` as kohya's sd-scripts precomputes them (A1111's and
    Forge's LoRA lists read them instead of hashing the file). Both hash the bytes safetensors writes for
    `tensors` with only the `ss_*` metadata, so that editing other keys later leaves them true: the model
    hash is the SHA-256 of everything after the header, i.e. of the tensor data alone; the legacy one the
    first 8 hex digits of the SHA-256 of the 64 KiB at offset 1 MiB (of nothing, in a smaller file)."""
    data = memoryview(safetensors.torch.save(tensors, {k: v for k, v in metadata.items() if k.startswith("ss_")}))
    header_length = int.from_bytes(data[:8], "little")
    return {
        "sshs_model_hash": hashlib.sha256(data[8 + header_length :]).hexdigest(),
        "sshs_legacy_hash": hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8],
    }


def write_lora(path: str | os.PathLike, trainer: Trainer, save: SaveConfig, started_at: float) -> None:
    if not all_finite(trainer.lora_parameters()):
        raise FloatingPointError(f"the LoRA's weights are not finite (NaN or inf) at step {trainer.state.step}; "
                                 f"{path} is not written. Lower train.learning_rate or use precision bf16/fp32")
    _write_lora_file(path, trainer, save, started_at)


def _write_lora_file(path: str | os.PathLike, trainer: Trainer, save: SaveConfig, started_at: float) -> None:
    """The LoRA file, its weights already known to be finite."""
    metadata = lora_metadata(
        trainer.family, trainer.lora_config, trainer.config, name=save.name, steps=trainer.state.step,
        started_at=started_at, trigger_word=save.trigger_word, dataset=save.dataset,
        text_encoders=tuple(trainer.text_encoding.names) if trainer.text_encoding is not None else (),
    )
    # With EMA on, every LoRA file (checkpoints' too) holds the average; resume.safetensors the trained weights.
    with ema_weights(trainer):
        tensors = lora_file_tensors(trainer, save)
    write_safetensors_atomic(path, tensors, metadata | kohya_hashes(tensors, metadata))


def loras_folder() -> Path:
    """ComfyUI's first `loras` folder, where the LoRA Loader looks."""
    return Path(folder_paths.get_folder_paths("loras")[0])


def save_lora(trainer: Trainer, save: SaveConfig, started_at: float) -> str:
    """Writes the trained LoRA as `<loras>/<name>/<name>.safetensors`, replacing an earlier run's
    of that name, and returns the name ComfyUI's LoRA Loader lists it under (no restart needed)."""
    root = loras_folder()
    path = root / save.name / f"{save.name}.safetensors"
    write_lora(path, trainer, save, started_at)
    comfy_compat.forget_file_list("loras")
    log.info("saved the LoRA of step %d to %s", trainer.state.step, path)
    return os.path.relpath(path, root)


def apply_lora_to_clone(patcher, network: LoraNetwork, strength: float = 1.0):
    """A clone of `patcher` carrying the LoRA the way ComfyUI's LoRA Loader applies a file: as
    weight patches of the clone, merged when ComfyUI loads it; the cached model stays as it is."""
    patched, _ = comfy.sd.load_lora_for_models(patcher, None, lora_state_dict(network), strength, 0)
    return patched


def apply_text_encoder_lora_to_clone(clip, trainer: Trainer, strength: float = 1.0):
    """A clone of `clip` carrying the trained text encoders' LoRA as ComfyUI's LoRA Loader applies it; a
    plain clone where no text encoder trained."""
    tensors = text_encoder_tensors(trainer)
    if not tensors:
        return clip.clone()
    _, patched = comfy.sd.load_lora_for_models(None, clip, tensors, 0, strength)
    return patched


# -- atomic files -------------------------------------------------------------------------------
#
# A file appears by rename of a temp file beside it, a dot-name ending in .tmp (ComfyUI's model lists
# filter by extension and never show it). Temp files and folders are made with the umask's mode, as
# ComfyUI's own outputs are (tempfile.mkstemp / mkdtemp would make them 0600 / 0700, and the rename
# keeps that). While a process writes a temp file it holds a lock on it; a temp file that nobody holds
# was left by a killed writer (kill -9, power loss) and is removed by the next write of that name.


def write_safetensors_atomic(
    path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> None:
    """Writes `path` whole or not at all; an earlier file there stays until the new one is complete."""
    _write_atomically(Path(path), lambda temp: safetensors.torch.save_file(tensors, temp, metadata))


def write_json_atomic(path: str | os.PathLike, value) -> None:
    text = json.dumps(value, indent=1)
    _write_atomically(Path(path), lambda temp: Path(temp).write_text(text, encoding="utf-8"))


def _write_atomically(path: Path, write: Callable[[str], None]) -> None:
    """Temp file beside `path`, fsync, rename over `path`, fsync the folder (the rename's record)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_files(path)
    handle, temp = _create_temp_file(path.parent, f".{path.name}.")
    try:
        if fcntl is not None:
            _flock(handle, wait=True)
        else:  # Windows cannot rename a file that is open: the temp file stays unlocked there.
            os.close(handle)
            handle = None
        write(str(temp))
        with open(temp, "r+b") as file:
            os.fsync(file.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temp)
        raise
    finally:
        if handle is not None:
            os.close(handle)
    _fsync_folder(path.parent)


def _create_temp_file(folder: Path, prefix: str) -> tuple[int, Path]:
    """A new, empty `<prefix><random>.tmp` in `folder`, open for writing, with the umask's mode."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    return _new_temp(folder, prefix, lambda temp: os.open(temp, flags, 0o666))


def _make_temp_folder(folder: Path, prefix: str) -> Path:
    """A new, empty `<prefix><random>.tmp` folder in `folder`, with the umask's mode."""
    return _new_temp(folder, prefix, lambda temp: os.mkdir(temp, 0o777))[1]


def _new_temp(folder: Path, prefix: str, create: Callable[[Path], object]) -> tuple[object, Path]:
    """(what `create(path)` returns, path) at a new `<prefix><random>.tmp` path in `folder`; `create`
    raises FileExistsError where the name is taken, and another is tried."""
    while True:
        temp = folder / f"{prefix}{secrets.token_hex(6)}.tmp"
        try:
            return create(temp), temp
        except FileExistsError:
            continue


def remove_stale_temp_files(path: str | os.PathLike) -> list[Path]:
    """Removes the temp files that killed writers of `path` left beside it and returns them. A temp
    file whose writer lives is locked and stays. (A writer between creating its file and locking it
    may lose it here; it then writes the file anew by name, so nothing is lost.) Windows has no such
    locks: its temp files stay."""
    path = Path(path)
    removed = []
    if fcntl is None or not path.parent.is_dir():
        return removed
    for temp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        try:
            handle = os.open(temp, os.O_RDONLY)
        except OSError:  # a folder, or gone already
            continue
        try:
            if not _flock(handle, wait=False):
                continue  # its writer is alive, or the file system cannot tell
        finally:
            os.close(handle)
        with contextlib.suppress(FileNotFoundError):
            os.remove(temp)
            removed.append(temp)
            log.info("removed %s, left by a save that was killed", temp)
    return removed


def _flock(handle: int, wait: bool) -> bool:
    """Takes an exclusive lock on the open file; False where another process holds it (wait=False) or
    where the file system has no locks (some network and FUSE ones), after which writers go unlocked."""
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        return True
    except BlockingIOError:
        return False
    except OSError as error:
        log.debug("no file locks here (%s): saves in this folder are not guarded against other processes", error)
        return False


@contextlib.contextmanager
def _locked(lock_file: Path):
    """Holds an exclusive lock on `lock_file` (made if missing), across processes, until the block ends."""
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    handle = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        if fcntl is not None:
            _flock(handle, wait=True)
        else:
            while True:
                try:
                    msvcrt.locking(handle, msvcrt.LK_LOCK, 1)
                    break
                except OSError:  # LK_LOCK gives up after 10 s; the other save is still running
                    continue
        try:
            yield
        finally:
            if fcntl is None:
                msvcrt.locking(handle, msvcrt.LK_UNLCK, 1)
    finally:
        os.close(handle)


def _fsync_folder(folder: Path) -> None:
    if os.name == "nt":  # Windows cannot open a folder for fsync; NTFS journals the rename itself.
        return
    handle = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


# -- resume state as safetensors + JSON -----------------------------------------------------------


def flatten_state(value) -> tuple[object, dict[str, torch.Tensor]]:
    """Splits nested dicts, lists and tuples of plain values and tensors into a JSON-able skeleton
    and the tensors it refers to by name (their path). Dicts with other than string keys (an
    optimizer's per-parameter state) and tuples keep their types. A tensor met twice (bitsandbytes
    shares its quantisation maps) is stored once and comes back as one object."""
    tensors: dict[str, torch.Tensor] = {}
    names: dict[int, str] = {}
    storages: set[int] = set()

    def encode(value, path: str):
        if isinstance(value, torch.Tensor):
            if id(value) not in names:
                tensor = value.detach().cpu().contiguous()
                storage = tensor.untyped_storage().data_ptr()
                # safetensors refuses tensors that share memory, e.g. views of one another.
                if tensor.numel() and storage in storages:
                    tensor = tensor.clone()
                storages.add(tensor.untyped_storage().data_ptr())
                name = path if path not in tensors else f"{path}#{len(tensors)}"
                names[id(value)] = name
                tensors[name] = tensor
            return {TENSOR: names[id(value)]}
        if isinstance(value, dict):
            if all(isinstance(key, str) and not key.startswith("$") for key in value):
                return {key: encode(item, f"{path}.{key}") for key, item in value.items()}
            return {ITEMS: [[encode(key, path), encode(item, f"{path}.{key}")] for key, item in value.items()]}
        if isinstance(value, tuple):
            return {TUPLE: [encode(item, f"{path}.{i}") for i, item in enumerate(value)]}
        if isinstance(value, list):
            return [encode(item, f"{path}.{i}") for i, item in enumerate(value)]
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        raise TypeError(f"{path}: a {type(value).__name__} cannot be stored in a resume state")

    return encode(value, "state"), tensors


def unflatten_state(skeleton, tensors: dict[str, torch.Tensor]):
    """The inverse of flatten_state."""

    def decode(value):
        if isinstance(value, list):
            return [decode(item) for item in value]
        if not isinstance(value, dict):
            return value
        if value.keys() == {TENSOR}:
            return tensors[value[TENSOR]]
        if value.keys() == {TUPLE}:
            return tuple(decode(item) for item in value[TUPLE])
        if value.keys() == {ITEMS}:
            return {decode(key): decode(item) for key, item in value[ITEMS]}
        return {key: decode(item) for key, item in value.items()}

    return decode(skeleton)


# -- checkpoints --------------------------------------------------------------------------------
#
# A run owns its checkpoints: each carries the run's id in resume.json, and a resumed run continues
# its checkpoint's id. The checkpoints folder of a name holds one run's checkpoints at a time: a save
# first moves those of any other run (an earlier run of the same name, or one in another process) into
# `checkpoints/run-<its id>/`, where they stay loadable. Pruning sees only the saving run's checkpoints.
# Saves into one checkpoints folder take turns, across processes, by a lock file beside it.

LOCK_FILE = ".checkpoints.lock"
UNKNOWN_RUN = "unknown"  # checkpoints of versions before run ids


class CheckpointError(ValueError):
    """A checkpoint cannot be resumed (damaged, or made by another kind of run); says which and why."""


class SaveFailed(OSError):
    """The finished LoRA could not be written; the message names what was saved in its place."""


def new_run_id() -> str:
    """When the run started and a random part: readable, sortable, and unique across processes."""
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


def output_folder(save: SaveConfig) -> Path:
    """Where a run's files go: `save.output_dir`, else ComfyUI's output folder."""
    return Path(save.output_dir or folder_paths.get_output_directory())


def checkpoints_folder(save: SaveConfig) -> Path:
    return output_folder(save) / save.name / "checkpoints"


def resume_target(save: SaveConfig, resume_from: str) -> Path:
    """What a Train LoRA's `resume_from` names: `latest`, this name's checkpoints folder (its newest
    checkpoint of the newest run); a relative path, one inside the output folder, where checkpoints are
    saved (not the folder ComfyUI was started from); an absolute path, itself."""
    if resume_from == "latest":
        return checkpoints_folder(save)
    return output_folder(save) / resume_from


def checkpoint_lora_name(name: str, step: int) -> str:
    return f"{name}-step{step:06d}.safetensors"


def run_settings(trainer: Trainer) -> dict:
    """What a checkpoint must match to resume into `trainer`: the weights' model and shapes, the
    optimizer's state layout and the gradient scaler's (fp16)."""
    return {"model": trainer.family.base_model_version, "rank": trainer.lora_config.rank,
            "algorithm": trainer.lora_config.algorithm, "optimizer": trainer.config.optimizer,
            "precision": trainer.config.precision, "ema_decay": trainer.config.ema_decay,
            "loraplus_lr_ratio": trainer.config.loraplus_lr_ratio, "text_encoders": trainer.lora_config.text_encoders}


# What checkpoints of versions that did not record a setting were trained with (before the algorithms
# were recorded, every run was plain LoRA; before text-encoder training, none trained).
SETTINGS_BEFORE_RECORDED = {"algorithm": "lora", "ema_decay": 0.0, "loraplus_lr_ratio": 1.0, "text_encoders": "none"}


def save_checkpoint(trainer: Trainer, save: SaveConfig, started_at: float, run_id: str) -> Path:
    """Writes the checkpoint of the trainer's current step for run `run_id`, keeps that run's last
    `save.keep_last`, and returns its folder. Weights that are not finite are never saved."""
    root = checkpoints_folder(save)
    step = trainer.state.step
    _refuse_non_finite(trainer, root, run_id)
    with _locked(root.parent / LOCK_FILE):
        root.mkdir(parents=True, exist_ok=True)
        # No save runs while the lock is held: staging folders found now were left by killed ones.
        for leftover in root.glob(".step-*.tmp"):
            shutil.rmtree(leftover, ignore_errors=True)
        _move_other_runs_aside(root, run_id)
        final = root / f"step-{step:06d}"
        staging = _make_temp_folder(root, f".{final.name}.")
        try:
            # _refuse_non_finite has checked the weights.
            _write_lora_file(staging / checkpoint_lora_name(save.name, step), trainer, save, started_at)
            state = {"network": trainer.network.state_dict(), "trainer": trainer.resume_state()}
            skeleton, tensors = flatten_state(state)
            write_safetensors_atomic(staging / "resume.safetensors", tensors)
            header = {"format": RESUME_FORMAT, "run": run_id, "step": step, "settings": run_settings(trainer)}
            write_json_atomic(staging / "resume.json", header | {"state": skeleton})
            _move_into_place(staging, final)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        _prune(root, run_id, save.keep_last)
    log.info("saved the checkpoint of step %d to %s", step, final)
    return final


def _refuse_non_finite(trainer: Trainer, root: Path, run_id: str) -> None:
    if all_finite(trainer.lora_parameters()):
        return
    good = own_checkpoints(root, run_id)
    kept = f"the last good checkpoint, {good[0]}, is kept" if good else "no earlier checkpoint of this run was saved"
    raise FloatingPointError(
        f"the LoRA's weights are not finite (NaN or inf) at step {trainer.state.step}, so they were not saved; "
        f"{kept}. Lower train.learning_rate (or use precision bf16/fp32) and resume from a good checkpoint"
    )


def _move_into_place(staging: Path, final: Path) -> None:
    # A folder cannot be renamed over a non-empty one: an earlier save of this step moves aside first.
    replaced = None
    if final.exists():
        replaced = _make_temp_folder(final.parent, f".{final.name}.replaced.")
        os.replace(final, replaced / final.name)
    os.replace(staging, final)
    _fsync_folder(final.parent)
    if replaced is not None:
        shutil.rmtree(replaced)


def run_of(checkpoint: Path) -> str:
    """The id of the run that saved `checkpoint` ("unknown" for one without, or unreadable)."""
    resume_json = checkpoint / "resume.json"
    try:
        return _run_in(str(resume_json), resume_json.stat().st_mtime_ns)
    except OSError:
        return UNKNOWN_RUN


@functools.lru_cache(maxsize=4096)
def _run_in(resume_json: str, mtime_ns: int) -> str:
    # Cached by modification time: every save asks it of every checkpoint of the name.
    try:
        header = json.loads(Path(resume_json).read_text(encoding="utf-8"))
        run = header.get("run") if isinstance(header, dict) else None
    except (OSError, ValueError):
        run = None
    return run if isinstance(run, str) and re.fullmatch(r"[\w.-]{1,64}", run) else UNKNOWN_RUN


def _move_other_runs_aside(root: Path, run_id: str) -> None:
    moved: dict[str, list[str]] = {}
    for checkpoint in list_checkpoints(root):
        run = run_of(checkpoint)
        if run != run_id:
            aside = root / f"run-{run}"
            aside.mkdir(exist_ok=True)
            _move_into_place(checkpoint, aside / checkpoint.name)
            moved.setdefault(run, []).append(checkpoint.name)
    for run, names in moved.items():
        log.warning("%s held the checkpoints of another run of this name (%s); they are kept in %s, where "
                    "resume_from finds them; this run's checkpoints go to %s", root, ", ".join(names),
                    root / f"run-{run}", root)


def list_checkpoints(folder: str | os.PathLike) -> list[Path]:
    """The checkpoint folders in a run's checkpoints folder, oldest step first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if p.is_dir() and (m := CHECKPOINT_NAME.fullmatch(p.name))]
    return [path for _, path in sorted(found)]


def newest_first(*folders: str | os.PathLike) -> list[Path]:
    """The checkpoint folders in `folders`, the last saved first (a run resumed from an earlier step
    saves lower steps after higher ones)."""

    def saved_at(path: Path) -> tuple[int, int]:
        with contextlib.suppress(OSError):
            return (path / "resume.json").stat().st_mtime_ns, int(path.name[len("step-"):])
        return 0, int(path.name[len("step-"):])

    return sorted((p for folder in folders for p in list_checkpoints(folder)), key=saved_at, reverse=True)


def own_checkpoints(root: Path, run_id: str) -> list[Path]:
    """Run `run_id`'s checkpoints under a name's checkpoints folder `root`, also those another run of the
    name moved aside, the last saved first."""
    return [path for path in newest_first(root, root / f"run-{run_id}") if run_of(path) == run_id]


def _prune(root: Path, run_id: str, keep_last: int) -> None:
    """Drops all but the last `keep_last` saved checkpoints of run `run_id` (0 keeps all), also those
    another run of the name moved aside."""
    if keep_last:
        for path in own_checkpoints(root, run_id)[keep_last:]:
            shutil.rmtree(path)


def find_checkpoint(path: str | os.PathLike) -> Path:
    """The checkpoint folder `path` names: a checkpoint folder, a file in one, or a run's
    checkpoints folder (then the checkpoint saved last there)."""
    path = Path(path)
    folder = path.parent if path.is_file() else path
    if (folder / "resume.json").is_file():
        return folder
    found = newest_first(folder)
    if not found:
        raise FileNotFoundError(
            f"no checkpoint at {path}: name a step-NNNNNN folder (it holds resume.json), "
            "a file in one, or the run's checkpoints folder"
        )
    return found[0]


@dataclass
class Checkpoint:
    folder: Path
    run: str
    settings: dict | None  # None for checkpoints of versions before they were recorded
    weights: dict[str, torch.Tensor]
    state: dict


def read_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """The checkpoint `path` names, read whole; a damaged one raises CheckpointError naming its folder."""
    folder = find_checkpoint(path)

    def damaged(what: str) -> CheckpointError:
        return CheckpointError(f"checkpoint {folder} is damaged: {what}; resume from another checkpoint")

    try:
        header = json.loads((folder / "resume.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise damaged(f"resume.json cannot be read ({error})") from None
    if not isinstance(header, dict) or not isinstance(header.get("state"), dict):
        raise damaged("resume.json does not hold a resume state")
    if header.get("format") != RESUME_FORMAT:
        raise CheckpointError(
            f"checkpoint {folder}: resume state format {header.get('format')!r}; this version reads {RESUME_FORMAT}"
        )
    try:
        tensors = safetensors.torch.load_file(folder / "resume.safetensors")
    except (OSError, safetensors.SafetensorError) as error:
        raise damaged(f"resume.safetensors cannot be read ({error})") from None
    try:
        state = unflatten_state(header["state"], tensors)
        weights, trainer_state = state["network"], state["trainer"]
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise damaged(f"resume.json and resume.safetensors do not fit together (missing {error})") from None
    if not isinstance(weights, dict) or not isinstance(trainer_state, dict):
        raise damaged("resume.json does not hold a resume state")
    settings = header.get("settings")
    return Checkpoint(folder, run_of(folder), settings if isinstance(settings, dict) else None, weights,
                      trainer_state)


def load_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """(LoRA network state dict, Trainer resume state) of the checkpoint `path` names."""
    checkpoint = read_checkpoint(path)
    return checkpoint.weights, checkpoint.state


def _check_fits(trainer: Trainer, checkpoint: Checkpoint) -> None:
    """Raises CheckpointError unless `checkpoint` can be loaded into `trainer` whole."""
    folder = checkpoint.folder
    if checkpoint.settings is not None:
        wanted = run_settings(trainer)
        for key, field in (("model", None), ("rank", "lora.rank"), ("algorithm", "lora.algorithm"),
                           ("optimizer", "train.optimizer"), ("precision", "train.precision"),
                           ("ema_decay", "train.ema_decay"), ("loraplus_lr_ratio", "train.loraplus_lr_ratio"),
                           ("text_encoders", "lora.text_encoders")):
            theirs, ours = checkpoint.settings.get(key, SETTINGS_BEFORE_RECORDED.get(key)), wanted[key]
            if theirs == ours:
                continue
            if field is None:
                raise CheckpointError(f"checkpoint {folder} is of a LoRA for {theirs}; this model is {ours}")
            raise CheckpointError(f"checkpoint {folder} was trained with {field} {theirs!r}, this run uses "
                                  f"{ours!r}: set {field} to {theirs!r} to resume it")
    ours = trainer.network.state_dict()
    theirs = checkpoint.weights
    if theirs.keys() != ours.keys():
        missing = sorted(ours.keys() - theirs.keys()) or sorted(theirs.keys() - ours.keys())
        raise CheckpointError(f"checkpoint {folder} does not fit this LoRA (other targets or model?): "
                              f"{missing[0]} is in one and not the other")
    for key, tensor in ours.items():
        if not isinstance(theirs[key], torch.Tensor) or theirs[key].shape != tensor.shape:
            shape = tuple(getattr(theirs[key], "shape", ()))
            raise CheckpointError(f"checkpoint {folder} does not fit this LoRA (other rank or model?): {key} is "
                                  f"{shape} there, {tuple(tensor.shape)} here")
    state = checkpoint.state
    for key in ("step", "samples_seen", "data_epoch", "data_batch"):
        value = state.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise CheckpointError(f"checkpoint {folder} is damaged: its {key} is {value!r}, not a whole number >= 0")
    if state["step"] > trainer.config.steps:
        raise CheckpointError(f"checkpoint {folder} is at step {state['step']}, past this run's "
                              f"train.steps ({trainer.config.steps}): set steps to {state['step']} or more")
    for key in ("generator", "caption_generator", "torch_rng"):
        if not isinstance(state.get(key), torch.Tensor) or state[key].dtype != torch.uint8:
            raise CheckpointError(f"checkpoint {folder} is damaged: its {key} state is missing")
    # The noise generator lives on the training device; its state's size tells a GPU run from a CPU one.
    if state["generator"].numel() != trainer.generator.get_state().numel() or (
            bool(state.get("cuda_rng")) != (trainer.device.type == "cuda")):
        raise CheckpointError(f"checkpoint {folder} was trained on another kind of device than this run's "
                              f"({trainer.device.type}): resume it on the device it was trained on")
    optimizer = state.get("optimizer")
    groups = optimizer.get("param_groups") if isinstance(optimizer, dict) else None
    if not isinstance(groups, list) or [len(g.get("params", ())) for g in groups if isinstance(g, dict)] != [
        len(g["params"]) for g in trainer.optimizer.param_groups
    ]:
        raise CheckpointError(f"checkpoint {folder} is damaged: its optimizer state does not fit this LoRA")


def resume(trainer: Trainer, path: str | os.PathLike) -> Checkpoint:
    """Continues `trainer` where a checkpoint left off (LoRA weights, optimizer, step, data order,
    random state); returns the checkpoint used (its folder and run id: a CheckpointHook given it
    continues that run). Build the trainer with the run's own LoRA and training configs: the weights
    must fit, and the schedule follows `steps`. Every check that can be made on the files comes before the
    trainer is touched; only an earlier version's checkpoint, which did not record its optimizer, can still
    be refused by the optimizer itself once the weights are in."""
    checkpoint = read_checkpoint(path)
    _check_fits(trainer, checkpoint)
    trainer.network.load_state_dict(checkpoint.weights)
    try:
        trainer.load_resume_state(checkpoint.state)
    except (KeyError, ValueError, RuntimeError, TypeError) as error:
        # What _check_fits cannot see: a checkpoint of an earlier version, which did not record its
        # optimizer, holding the state of another one.
        raise CheckpointError(
            f"checkpoint {checkpoint.folder} does not fit this run's optimizer ({type(error).__name__}: {error}); "
            "resume with the optimizer it was trained with"
        ) from None
    log.info("resumed at step %d from %s", trainer.state.step, checkpoint.folder)
    return checkpoint


class CheckpointHook(JobHook):
    """Saves what a run leaves behind: a checkpoint every `save.every` steps and, when the run
    stops early (Cancel), a last one to resume from; a finished run's LoRA goes into ComfyUI's
    loras folder. Each save is reported as a "saved" event. `resumed` (what `resume` returned)
    continues that checkpoint's run; without it, this is a new run with an id of its own."""

    def __init__(self, save: SaveConfig, started_at: float | None = None, resumed: Checkpoint | None = None):
        self.save = save
        self.every = save.every
        self.started_at = time.time() if started_at is None else started_at
        self.run_id = resumed.run if resumed is not None and resumed.run != UNKNOWN_RUN else new_run_id()
        self.saved_step: int | None = None

    def on_step(self, trainer: Trainer) -> list[Event]:
        return [self._checkpoint(trainer)]

    def on_end(self, trainer: Trainer, cancelled: bool) -> list[Event]:
        # A cancel that lands on the last step still finished the run.
        if trainer.state.step < trainer.config.steps:
            # A save asked for at this very step has written its checkpoint already.
            return [] if self.saved_step == trainer.state.step else [self._checkpoint(trainer)]

        def write() -> list[Event]:
            name = save_lora(trainer, self.save, self.started_at)
            data = {"kind": "lora", "name": name, "path": str(loras_folder() / name), "step": trainer.state.step}
            return [Event("saved", data)]

        return self._write_final(trainer, write)

    def _write_final(self, trainer: Trainer, write: Callable[[], list[Event]]) -> list[Event]:
        """Runs `write()`, which writes the finished LoRA; when that fails (a full disk), saves a
        checkpoint of the last step instead, so that nothing trained is lost, and raises naming it."""
        try:
            return write()
        except (OSError, safetensors.SafetensorError) as error:
            lora_error = error
        step = trainer.state.step
        try:
            checkpoint = self._checkpoint(trainer).data["path"]
        except (OSError, safetensors.SafetensorError) as error:
            root = checkpoints_folder(self.save)
            own = own_checkpoints(root, self.run_id)
            newest = f"the newest checkpoint of this run is {own[0]}" if own else "no checkpoint of this run is saved"
            raise SaveFailed(
                f"the LoRA of step {step} could not be written ({lora_error}), nor a checkpoint of it ({error}); "
                f"{newest}. Free disk space and run again"
            ) from lora_error
        raise SaveFailed(
            f"the LoRA of step {step} could not be written ({lora_error}); the trained weights are saved in the "
            f"checkpoint {checkpoint}. Free disk space and resume from it: the run then writes the LoRA at once"
        ) from lora_error

    def _checkpoint(self, trainer: Trainer) -> Event:
        folder = save_checkpoint(trainer, self.save, self.started_at, self.run_id)
        step = self.saved_step = trainer.state.step
        lora = folder / checkpoint_lora_name(self.save.name, step)
        return Event("saved", {"kind": "checkpoint", "path": str(folder), "lora": str(lora), "step": step})


# -- our LoRA files back into the engine ----------------------------------------------------------


# Key suffixes of one layer in a file, by algorithm (the `.alpha` aside): kohya's and LyCORIS' forms.
ALGORITHM_PARTS = {
    "lora": ({"lora_down.weight", "lora_up.weight"},),
    "dora": ({"lora_down.weight", "lora_up.weight", "dora_scale"},),
    "loha": ({"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"},),
    "lokr": ({"lokr_w1", "lokr_w2"}, {"lokr_w1", "lokr_w2_a", "lokr_w2_b"}),
}
LAYER_PARTS = {"alpha"}.union(*(parts for forms in ALGORITHM_PARTS.values() for parts in forms))


@dataclass
class LayerWeights:
    tensors: dict[str, torch.Tensor]  # by key suffix (`lora_down.weight`, `hada_w1_a`, ...), fp32
    alpha: float

    @property
    def algorithm(self) -> str:
        return next(name for name, forms in ALGORITHM_PARTS.items() if set(self.tensors) in forms)

    @property
    def down(self) -> torch.Tensor:  # (rank, in) or (rank, in, kh, kw): LoRA and DoRA
        return self.tensors["lora_down.weight"]

    @property
    def up(self) -> torch.Tensor:  # (out, rank) or (out, rank, 1, 1): LoRA and DoRA
        return self.tensors["lora_up.weight"]

    @property
    def rank(self) -> int | None:
        """The rank alpha is divided by; None for a LoKr with a full w2, which ComfyUI does not scale."""
        first = {"lora": "lora_down.weight", "dora": "lora_down.weight", "loha": "hada_w1_b", "lokr": "lokr_w2_b"}
        tensor = self.tensors.get(first[self.algorithm])
        return None if tensor is None else tensor.shape[0]


@dataclass
class LoraFile:
    layers: dict[str, LayerWeights]  # by kohya layer name, "lora_unet_..."
    metadata: dict[str, str]
    # The text encoders' layers, by kohya layer name ("lora_te1_...", see text_encoders.KOHYA_PREFIXES).
    text_layers: dict[str, LayerWeights] = field(default_factory=dict)

    @property
    def rank(self) -> int | None:
        return self._uniform("rank")

    @property
    def alpha(self) -> float:
        return self._uniform("alpha")

    @property
    def algorithm(self) -> str:
        return self._uniform("algorithm")

    def _uniform(self, attribute: str):
        values = {getattr(layer, attribute) for layer in self.layers.values()}
        if attribute == "rank" and len(values) > 1:
            values.discard(None)  # full-rank LoKr layers beside low-rank ones
        if len(values) != 1:
            raise ValueError(f"the layers of this LoRA have different {attribute}s: {sorted(values, key=str)}")
        return values.pop()

    @property
    def network_args(self) -> dict[str, str]:
        """`ss_network_args` of the metadata ({} where absent or not a JSON object)."""
        try:
            args = json.loads(self.metadata.get("ss_network_args", "{}"))
        except ValueError:
            return {}
        return args if isinstance(args, dict) else {}


def load_lora_file(path: str | os.PathLike) -> LoraFile:
    """Reads a kohya-style LoRA of the diffusion model and its text encoders (ours, or any that uses the same
    keys): LoRA, DoRA, LoHa or LoKr layers; weights as fp32."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    prefixes = (LORA_PREFIX, *KOHYA_PREFIXES.values())
    with safetensors.safe_open(str(path), framework="pt") as file:
        metadata = file.metadata() or {}
        for key in file.keys():
            layer, _, part = key.partition(".")
            if not layer.startswith(prefixes) or part not in LAYER_PARTS:
                raise ValueError(
                    f"{path}: {key!r} is not a key of a kohya-style LoRA (lora_unet_* / lora_te1_* / lora_te2_* / "
                    "lora_te3_* + .lora_down.weight / .lora_up.weight / .alpha, with .dora_scale for DoRA; "
                    ".hada_w1_a ... .hada_w2_b for LoHa; .lokr_w1 and .lokr_w2 or .lokr_w2_a / _b for LoKr)"
                )
            groups.setdefault(layer, {})[part] = file.get_tensor(key)
    layers, text_layers = {}, {}
    for name, parts in groups.items():
        alpha = parts.pop("alpha", None)
        tensors = {part: tensor.float() for part, tensor in parts.items()}
        if not any(set(tensors) in forms for forms in ALGORITHM_PARTS.values()):
            raise ValueError(f"{path}: layer {name} has {sorted(tensors)}, which is none of LoRA's, DoRA's, LoHa's "
                             "or LoKr's sets of weights; the file is incomplete or of another kind")
        weights = LayerWeights(tensors, 0.0)
        # Without alpha, ComfyUI scales by 1.0, i.e. alpha = rank.
        weights.alpha = float(alpha) if alpha is not None else float(weights.rank or 1)
        (layers if name.startswith(LORA_PREFIX) else text_layers)[name] = weights
    if not layers:
        raise ValueError(f"{path} holds no LoRA layers of the diffusion model")
    return LoraFile(layers, metadata, text_layers)


def network_from_lora(lora: LoraFile, diffusion_model: nn.Module, dropout: float = 0.0) -> LoraNetwork:
    """A LoraNetwork holding the file's weights, of the file's algorithm, on the layers of `diffusion_model`
    they name, to continue training an existing LoRA (pass it to Trainer as `network`)."""
    bases = {
        kohya_name(path): (path, module) for path, module in diffusion_model.named_modules()
        if isinstance(module, (nn.Linear, nn.Conv2d))
    }
    # LoKr's split of each dimension: the factor recorded in the metadata, else those its w1 shows.
    recorded = lora.network_args.get("factor", "")
    layers = {}
    for name, weights in lora.layers.items():
        if name not in bases:
            raise ValueError(f"the model has no layer for {name!r}; this LoRA was made for another architecture")
        path, base = bases[name]
        config = LoraConfig(rank=weights.rank or 1, alpha=weights.alpha, dropout=dropout,
                            algorithm=weights.algorithm, lokr_full_rank="lokr_w2" in weights.tensors)
        factors = [-1]
        if config.algorithm == "lokr":
            w1 = weights.tensors["lokr_w1"].shape
            given = [int(recorded)] if recorded.lstrip("-").isdigit() else []
            factors = list(dict.fromkeys([*given, -1, *w1]))
        layer = None
        for factor in factors:
            candidate = lora_layer_for(base, replace(config, lokr_factor=factor))
            shapes = {suffix: shape for suffix, (_, shape) in candidate.file_parameters().items()}
            if shapes == {suffix: tuple(t.shape) for suffix, t in weights.tensors.items()}:
                layer = candidate
                break
        if layer is None:
            # No split fits: the error names the first key whose shape differs.
            layer = lora_layer_for(base, replace(config, lokr_factor=factors[0]))
        layer.load_file_tensors(weights.tensors, name)
        layers[path] = layer
    return LoraNetwork(layers)
