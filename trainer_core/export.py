"""LoRA files that ComfyUI's LoRA Loader reads as they are, checkpoints, and resuming from them.

A LoRA file holds kohya-style keys for every adapted layer: `lora_unet_<module path inside
diffusion_model, dots as underscores>` + `.lora_down.weight`, `.lora_up.weight`, `.alpha`.
ComfyUI scales each layer by alpha / rows of lora_down, which is the training scale.

A checkpoint is a folder `<output>/<name>/checkpoints/step-NNNNNN/` with the LoRA file at that
step (loadable as is) and the resume state: `resume.safetensors` holds every tensor (the fp32
LoRA weights, optimizer moments, RNG states), `resume.json` everything else, referring to those
tensors by name. Files and checkpoint folders appear only by rename, so a crash leaves a whole
one or none; unfinished ones are hidden dot-names ending in `.tmp`.
"""

import contextlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import comfy.sd
import folder_paths
import safetensors
import safetensors.torch
import torch
from torch import nn

from . import comfy_compat
from .config import LoraConfig, SaveConfig, TrainConfig
from .families.base import Family
from .job import Event, JobHook
from .lora import LoraNetwork, lora_layer_for
from .trainer import Trainer

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


def lora_state_dict(network: LoraNetwork, dtype: str = "fp32") -> dict[str, torch.Tensor]:
    """The network in kohya's key layout, on the CPU, weights in `dtype` ("fp16", "bf16", "fp32").

    Tensors are copies: a consumer that keeps them (ComfyUI's patches) does not follow further training.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    tensors = {}
    for path, layer in network.items():
        name = kohya_name(path)
        if f"{name}.alpha" in tensors:
            raise ValueError(f"two layers, one of them {path!r}, have the same LoRA key {name!r}")
        tensors[f"{name}.lora_down.weight"] = layer.down.detach().to("cpu", DTYPES[dtype], copy=True).contiguous()
        tensors[f"{name}.lora_up.weight"] = layer.up.detach().to("cpu", DTYPES[dtype], copy=True).contiguous()
        # fp32 whatever the weights' dtype: alpha / rank is the scale, and bf16 would round e.g. 0.3.
        tensors[f"{name}.alpha"] = torch.tensor(layer.alpha, dtype=torch.float32)
    return tensors


def lora_metadata(
    family: Family, lora: LoraConfig, train: TrainConfig, *, name: str, steps: int, started_at: float,
    trigger_word: str = "",
) -> dict[str, str]:
    """The safetensors header: kohya's `ss_*` keys and the model spec's, which LoRA managers read."""
    training_config = {"lora": asdict(lora), "train": train.to_dict()}
    return {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(lora.rank),
        "ss_network_alpha": str(float(lora.alpha)),
        "ss_base_model_version": family.base_model_version,
        "ss_output_name": name,
        "ss_steps": str(steps),
        "ss_training_started_at": str(started_at),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": family.modelspec_architecture,
        "modelspec.title": name,
        "modelspec.trigger_phrase": trigger_word,
        # `extra` may hold values JSON lacks; their text is enough for a record.
        "ss_training_config": json.dumps(training_config, sort_keys=True, default=str),
    }


def write_lora(path: str | os.PathLike, trainer: Trainer, save: SaveConfig, started_at: float) -> None:
    metadata = lora_metadata(
        trainer.family, trainer.lora_config, trainer.config, name=save.name, steps=trainer.state.step,
        started_at=started_at, trigger_word=save.trigger_word,
    )
    write_safetensors_atomic(path, lora_state_dict(trainer.network, save.dtype), metadata)


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


# -- atomic files -------------------------------------------------------------------------------


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
    # A dot-name ending in .tmp: ComfyUI's model lists filter by extension and never show it.
    handle, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        write(temp)
        with open(temp, "r+b") as file:
            os.fsync(file.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temp)
        raise
    _fsync_folder(path.parent)


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


def checkpoints_folder(save: SaveConfig) -> Path:
    return Path(save.output_dir or folder_paths.get_output_directory()) / save.name / "checkpoints"


def checkpoint_lora_name(name: str, step: int) -> str:
    return f"{name}-step{step:06d}.safetensors"


def save_checkpoint(trainer: Trainer, save: SaveConfig, started_at: float) -> Path:
    """Writes the checkpoint of the trainer's current step, keeps the last `save.keep_last`, and
    returns its folder."""
    root = checkpoints_folder(save)
    root.mkdir(parents=True, exist_ok=True)
    step = trainer.state.step
    final = root / f"step-{step:06d}"
    staging = Path(tempfile.mkdtemp(dir=root, prefix=f".{final.name}.", suffix=".tmp"))
    try:
        write_lora(staging / checkpoint_lora_name(save.name, step), trainer, save, started_at)
        state = {"network": trainer.network.state_dict(), "trainer": trainer.resume_state()}
        skeleton, tensors = flatten_state(state)
        write_safetensors_atomic(staging / "resume.safetensors", tensors)
        write_json_atomic(staging / "resume.json", {"format": RESUME_FORMAT, "step": step, "state": skeleton})
        _move_into_place(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _prune(root, save.keep_last)
    log.info("saved the checkpoint of step %d to %s", step, final)
    return final


def _move_into_place(staging: Path, final: Path) -> None:
    # A folder cannot be renamed over a non-empty one: an earlier save of this step moves aside first.
    replaced = None
    if final.exists():
        replaced = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.replaced.", suffix=".tmp"))
        os.replace(final, replaced / final.name)
    os.replace(staging, final)
    _fsync_folder(final.parent)
    if replaced is not None:
        shutil.rmtree(replaced)


def list_checkpoints(folder: str | os.PathLike) -> list[Path]:
    """The checkpoint folders in a run's checkpoints folder, oldest step first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if p.is_dir() and (m := CHECKPOINT_NAME.fullmatch(p.name))]
    return [path for _, path in sorted(found)]


def _prune(root: Path, keep_last: int) -> None:
    """Drops all but the newest `keep_last` checkpoints (0 keeps all) and what crashed saves left."""
    old = list_checkpoints(root)[:-keep_last] if keep_last else []
    leftovers = [p for p in root.glob(".step-*.tmp") if p.is_dir()]
    for path in old + leftovers:
        shutil.rmtree(path)


def find_checkpoint(path: str | os.PathLike) -> Path:
    """The checkpoint folder `path` names: a checkpoint folder, a file in one, or a run's
    checkpoints folder (then its newest checkpoint)."""
    path = Path(path)
    folder = path.parent if path.is_file() else path
    if (folder / "resume.json").is_file():
        return folder
    found = list_checkpoints(folder)
    if not found:
        raise FileNotFoundError(
            f"no checkpoint at {path}: name a step-NNNNNN folder (it holds resume.json), "
            "a file in one, or the run's checkpoints folder"
        )
    return found[-1]


def load_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """(LoRA network state dict, Trainer resume state) of the checkpoint `path` names."""
    folder = find_checkpoint(path)
    header = json.loads((folder / "resume.json").read_text(encoding="utf-8"))
    if header.get("format") != RESUME_FORMAT:
        raise ValueError(f"{folder}: resume state format {header.get('format')!r}; this version reads {RESUME_FORMAT}")
    state = unflatten_state(header["state"], safetensors.torch.load_file(folder / "resume.safetensors"))
    return state["network"], state["trainer"]


def resume(trainer: Trainer, path: str | os.PathLike) -> Path:
    """Continues `trainer` where a checkpoint left off (LoRA weights, optimizer, step, data order,
    random state); returns the checkpoint folder used. Build the trainer with the run's own LoRA
    and training configs: the weights must fit, and the schedule follows `steps`."""
    folder = find_checkpoint(path)
    weights, state = load_checkpoint(folder)
    try:
        trainer.network.load_state_dict(weights)
    except RuntimeError as error:
        raise ValueError(
            f"checkpoint {folder} does not fit this LoRA (other rank, targets or model?): {error}"
        ) from None
    trainer.load_resume_state(state)
    log.info("resumed at step %d from %s", trainer.state.step, folder)
    return folder


class CheckpointHook(JobHook):
    """Saves what a run leaves behind: a checkpoint every `save.every` steps and, when the run
    stops early (Cancel), a last one to resume from; a finished run's LoRA goes into ComfyUI's
    loras folder. Each save is reported as a "saved" event."""

    def __init__(self, save: SaveConfig, started_at: float | None = None):
        self.save = save
        self.every = save.every
        self.started_at = time.time() if started_at is None else started_at

    def on_step(self, trainer: Trainer) -> list[Event]:
        return [self._checkpoint(trainer)]

    def on_end(self, trainer: Trainer, cancelled: bool) -> list[Event]:
        # A cancel that lands on the last step still finished the run.
        if trainer.state.step < trainer.config.steps:
            return [self._checkpoint(trainer)]
        name = save_lora(trainer, self.save, self.started_at)
        data = {"kind": "lora", "name": name, "path": str(loras_folder() / name), "step": trainer.state.step}
        return [Event("saved", data)]

    def _checkpoint(self, trainer: Trainer) -> Event:
        folder = save_checkpoint(trainer, self.save, self.started_at)
        step = trainer.state.step
        lora = folder / checkpoint_lora_name(self.save.name, step)
        return Event("saved", {"kind": "checkpoint", "path": str(folder), "lora": str(lora), "step": step})


# -- our LoRA files back into the engine ----------------------------------------------------------


@dataclass
class LayerWeights:
    down: torch.Tensor  # (rank, in) or (rank, in, kh, kw)
    up: torch.Tensor  # (out, rank) or (out, rank, 1, 1)
    alpha: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]


@dataclass
class LoraFile:
    layers: dict[str, LayerWeights]  # by kohya layer name, "lora_unet_..."
    metadata: dict[str, str]

    @property
    def rank(self) -> int:
        return self._uniform("rank")

    @property
    def alpha(self) -> float:
        return self._uniform("alpha")

    def _uniform(self, attribute: str):
        values = {getattr(layer, attribute) for layer in self.layers.values()}
        if len(values) != 1:
            raise ValueError(f"the layers of this LoRA have different {attribute}s: {sorted(values)}")
        return values.pop()


LAYER_PARTS = ("lora_down.weight", "lora_up.weight", "alpha")


def load_lora_file(path: str | os.PathLike) -> LoraFile:
    """Reads a kohya-style LoRA of the diffusion model (ours, or any that uses the same keys); weights as fp32."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    with safetensors.safe_open(str(path), framework="pt") as file:
        metadata = file.metadata() or {}
        for key in file.keys():
            layer, _, part = key.partition(".")
            if not layer.startswith(LORA_PREFIX) or part not in LAYER_PARTS:
                raise ValueError(
                    f"{path}: {key!r} is not a key of a kohya-style LoRA of the diffusion model "
                    "(lora_unet_*.lora_down.weight / .lora_up.weight / .alpha)"
                )
            groups.setdefault(layer, {})[part] = file.get_tensor(key)
    layers = {}
    for name, parts in groups.items():
        if "lora_down.weight" not in parts or "lora_up.weight" not in parts:
            raise ValueError(f"{path}: layer {name} lacks its lora_down or lora_up weight")
        down, up = parts["lora_down.weight"].float(), parts["lora_up.weight"].float()
        # Without alpha, ComfyUI scales by 1.0, i.e. alpha = rank.
        alpha = float(parts["alpha"]) if "alpha" in parts else float(down.shape[0])
        layers[name] = LayerWeights(down, up, alpha)
    if not layers:
        raise ValueError(f"{path} holds no LoRA layers")
    return LoraFile(layers, metadata)


def network_from_lora(lora: LoraFile, diffusion_model: nn.Module, dropout: float = 0.0) -> LoraNetwork:
    """A LoraNetwork holding the file's weights, on the layers of `diffusion_model` they name, to
    continue training an existing LoRA (pass it to Trainer as `network`)."""
    bases = {
        kohya_name(path): (path, module) for path, module in diffusion_model.named_modules()
        if isinstance(module, (nn.Linear, nn.Conv2d))
    }
    layers = {}
    for name, weights in lora.layers.items():
        if name not in bases:
            raise ValueError(f"the model has no layer for {name!r}; this LoRA was made for another architecture")
        path, base = bases[name]
        layer = lora_layer_for(base, LoraConfig(rank=weights.rank, alpha=weights.alpha, dropout=dropout))
        for parameter, value in ((layer.down, weights.down), (layer.up, weights.up)):
            if parameter.shape != value.shape:
                raise ValueError(
                    f"{name}: the file's {tuple(value.shape)} does not fit the model's layer "
                    f"({tuple(parameter.shape)}); this LoRA was made for another model size"
                )
        with torch.no_grad():
            layer.down.copy_(weights.down)
            layer.up.copy_(weights.up)
        layers[path] = layer
    return LoraNetwork(layers)
