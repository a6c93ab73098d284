"""The run behind `lora-train`: models from files through ComfyUI's loaders, then the engine as the
nodes drive it (build_samples, Trainer, TrainingJob with checkpoint and sample hooks), with progress
on the terminal; under torchrun, data-parallel (distributed.py). Imports ComfyUI: import it only after
`cli.import_comfyui`.

Files, as ai-toolkit lays them out: checkpoints in `<training_folder>/<name>/checkpoints/step-NNNNNN/`,
previews in `<training_folder>/<name>/samples/`, the finished LoRA as
`<training_folder>/<name>/<name>.safetensors`, the dataset cache in `<training_folder>/lora_trainer_cache/`.
"""

import contextlib
import logging
import math
import re
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path

import comfy.model_management
import torch

from . import distributed, export, loading
from .config import ConfigError, LoraConfig, SaveConfig, TrainConfig, check_save_format
from .data import DatasetConfig, DatasetError, Datasets, build_samples
from .families import UnsupportedModelError
from .job import Event, OutOfMemory, TrainingFailed, TrainingJob
from .sampling import SampleHook, SampleSettings, encode_prompts
from .trainer import Trainer
from .validation import validation_hooks
from .yaml_config import FAMILY_FLAGS, ConfigFileError, ResolvedConfig

log = logging.getLogger(__name__)

EXIT_FAILED, EXIT_INTERRUPTED = 1, 130
NOISE_SCHEDULER_OF = {"sdxl": "ddpm", "sd3": "flowmatch", "flux": "flowmatch"}
FLOAT8 = torch.float8_e4m3fn
MAX_ETA_DAYS = 9999

# Engine config field -> the short-form key it comes from, so the engine's own checks name the YAML line.
LORA_KEYS = {"rank": "network.linear", "alpha": "network.linear_alpha", "dropout": "network.dropout",
             "algorithm": "network.type", "lokr_factor": "network.lokr_factor",
             "lokr_full_rank": "network.lokr_full_rank", "text_encoders": "network.text_encoders"}
TRAIN_KEYS = {
    "steps": "train.steps", "learning_rate": "train.lr", "batch_size": "train.batch_size",
    "text_encoder_lr": "train.text_encoder_lr",
    "gradient_accumulation": "train.gradient_accumulation", "optimizer": "train.optimizer",
    "schedule": "train.lr_scheduler", "warmup_steps": "train.warmup_steps", "max_grad_norm": "train.max_grad_norm",
    "precision": "train.dtype", "gradient_checkpointing": "train.gradient_checkpointing", "seed": "train.seed",
    "blocks_to_swap": "train.blocks_to_swap",
    "validation_every": "train.validation_every", "loraplus_lr_ratio": "train.loraplus_lr_ratio",
    "ema_decay": "train.ema_config.ema_decay",
}
SAVE_KEYS = {
    "name": "name", "dtype": "save.dtype", "every": "save.save_every", "keep_last": "save.max_step_saves_to_keep",
    "output_dir": "training_folder", "trigger_word": "trigger_word", "format": "save.format",
}
# DatasetConfig field -> the key of the `index`-th entry of `datasets:` (or of the process) it comes from.
DATASET_KEYS = {
    "folder": "folder_path", "caption_extension": "caption_ext", "default_caption": "default_caption",
    "caption_dropout": "caption_dropout_rate", "shuffle_tags": "shuffle_tokens", "keep_tags": "keep_tokens",
    "flip": "flip_x", "resolution": "resolution", "repeats": "num_repeats", "mask_folder": "mask_path",
    "alpha_mask": "alpha_mask", "regularization": "is_reg", "loss_weight": "loss_multiplier",
    "validation_split": "validation_split", "validation_folder": "validation_folder",
}
PROCESS_DATASET_KEYS = {
    "trigger_word": "trigger_word", "seed": "train.seed",
    "preservation_class": "train.diff_output_preservation_class",
    "preservation_weight": "train.diff_output_preservation_multiplier",
}
SAMPLE_KEYS = {"seed": "sample.seed", "width": "sample.width", "height": "sample.height",
               "steps": "sample.sample_steps", "negative": "sample.neg"}


def dataset_keys(index: int) -> dict[str, str]:
    return {field: f"datasets[{index}].{key}" for field, key in DATASET_KEYS.items()} | PROCESS_DATASET_KEYS


def value_at(values: dict, path: str):
    for part in re.sub(r"\[(\d+)\]", r".\1", path).split("."):
        values = values[int(part)] if part.isdigit() else values[part]
    return values


@contextlib.contextmanager
def named_in_file(config: ResolvedConfig, keys: dict[str, str]):
    """Raises an engine error ("owner.field: ...") again naming the file, line and key it came from."""
    try:
        yield
    except (ConfigError, DatasetError) as error:
        owner_field, _, message = str(error).partition(": ")
        field = owner_field.rpartition(".")[2]
        if field not in keys:
            raise ConfigFileError(f"{config.file}: {error}") from None
        raise config.error(keys[field], message) from None


def build(config: ResolvedConfig, make, keys: dict[str, str], **extra):
    """`make(**fields)` from the config's values at `keys` (engine field -> short-form key); `extra`
    gives fields that are computed from those values."""
    with named_in_file(config, keys):
        read = {field: value_at(config.values, path) for field, path in keys.items() if field not in extra}
        return make(**read, **extra)


@dataclass
class Models:
    patcher: object
    clip: object
    vae: object
    family: str


def load_models(config: ResolvedConfig) -> Models:
    """The diffusion model, text encoders and VAE that `model` names. With `text_encoder_paths`,
    `name_or_path` is a diffusion-model file (and `vae_path` is needed); otherwise a checkpoint, whose
    VAE `vae_path` may replace. The family is detected from the weights and checked against the flags."""
    model = config.values["model"]
    path = model["name_or_path"]
    is_checkpoint = not model["text_encoder_paths"]
    if not is_checkpoint and not model["vae_path"]:
        raise config.error("model.vae_path", "a diffusion-model file (with text_encoder_paths) needs a VAE file")
    hint = ("for a diffusion-model file give model.text_encoder_paths and model.vae_path" if is_checkpoint
            else "give the diffusion model's own file here")
    try:
        with loader_of(config, "model.name_or_path", path, "a checkpoint" if is_checkpoint else "a diffusion model",
                       hint):
            patcher, clip, vae, family = loading.load_diffusion_model(
                path, is_checkpoint, FLOAT8 if model["quantize"] else None)
    except UnsupportedModelError as error:
        raise config.error("model.name_or_path", str(error)) from None
    for flag, claimed in FAMILY_FLAGS.items():
        if model[flag] and claimed != family:
            raise config.error(f"model.{flag}", f"says {claimed}, but the weights in {path} are {family}")
    if model["text_encoder_paths"]:
        hint = f"give {family}'s text encoder files, in ComfyUI's loader order"
        for index, file in enumerate(model["text_encoder_paths"]):
            with loader_of(config, f"model.text_encoder_paths[{index}]", file, "a text encoder", hint):
                loading.check_weights_file(file)
        with loader_of(config, "model.text_encoder_paths", "these files", f"{family}'s text encoders", hint):
            clip = loading.load_text_encoders(model["text_encoder_paths"], family)
    if model["vae_path"]:
        with loader_of(config, "model.vae_path", model["vae_path"], "a VAE", f"give {family}'s VAE file"):
            vae = loading.load_vae(model["vae_path"])
    if clip is None or vae is None:
        raise config.error("model.name_or_path", f"{path} holds no {'text encoders' if clip is None else 'VAE'}; "
                           "give model.text_encoder_paths and model.vae_path")
    log.info("model: %s (%s)", path, family)
    return Models(patcher, clip, vae, family)


@contextlib.contextmanager
def loader_of(config: ResolvedConfig, key: str, path: str, what: str, hint: str):
    """Raises a failure of ComfyUI's loaders on the file at `key` as an error of that key, saying
    what the file could not be loaded as; running out of memory is not the file's fault."""
    try:
        yield
    except (torch.OutOfMemoryError, UnsupportedModelError):
        raise
    except Exception as error:  # noqa: BLE001 - whatever a loader raises on a file, the file is wrong
        first_line = next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
        # The user reads one line; the loader's traceback stays in the debug log, should the fault be ours.
        log.debug("loading %s failed", path, exc_info=True)
        raise config.error(key, f"{path} cannot be loaded as {what} ({first_line}): {hint}") from None


def text_encoders_of(config: ResolvedConfig) -> str:
    """network.text_encoders, or "clip" where it is left out and ai-toolkit's train.train_text_encoder is true."""
    chosen = config.values["network"]["text_encoders"]
    if chosen == "none" and config.values["train"]["train_text_encoder"]:
        return "clip"
    return chosen


def sample_settings(config: ResolvedConfig, models: Models) -> SampleSettings | None:
    """The previews' settings, or None without prompts. `[trigger]` in a prompt is the trigger word;
    guidance_scale is Flux's guidance for Flux, the cfg scale otherwise; 0 keeps the family's default."""
    sample = config.values["sample"]
    if not sample["prompts"]:
        return None
    trigger = config.values["trigger_word"]
    prompts = tuple(prompt.replace("[trigger]", trigger) for prompt in sample["prompts"])
    scale = {"guidance": sample["guidance_scale"]} if models.family == "flux" else {"cfg": sample["guidance_scale"]}
    settings = build(config, SampleSettings, SAMPLE_KEYS | {"prompts": "sample.prompts"}, **scale, prompts=prompts)
    return settings.resolved(models.patcher)


def memory_text(size_bytes: int | None) -> str:
    """A memory size as the progress line shows it ("6.12 GiB"); "" for none (a run on the CPU)."""
    return "" if size_bytes is None else f"{size_bytes / 2**30:.2f} GiB"


class TerminalProgress:
    """One line per training step on stderr: step/total, loss, learning rate, speed, ETA and, on a
    GPU, the run's peak memory."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr

    def show(self, event: Event) -> None:
        data = event.data
        if event.kind == "started" and data["compiling"]:
            log.info("compiling the model's blocks: the first step takes a minute or two")
        elif event.kind == "step":
            peak = memory_text(data.get("peak_vram_bytes"))
            peak_text = f"  peak VRAM {peak}" if peak else ""
            self.stream.write(
                f"step {data['step']}/{data['total_steps']}  loss {data['loss']:.4f}  lr {data['lr']:.2e}  "
                f"{data['images_per_second']:.2f} img/s  ETA {eta_text(data['eta_seconds'])}{peak_text}\n"
            )
            self.stream.flush()
        elif event.kind == "validation":
            self.stream.write(f"step {data['step']}/{data['total_steps']}  validation loss "
                              f"{data['validation_loss']:.4f}\n")
            self.stream.flush()
        elif event.kind == "sample":
            log.info("samples of step %d: %s", data["step"], ", ".join(data["files"]))
        elif event.kind == "saved" and data["kind"] == "lora":  # export logs the checkpoints it saves
            log.info("saved the LoRA of step %d to %s", data["step"], data["path"])


def eta_text(seconds: float | None) -> str:
    """h:mm:ss, or days; "?" before there is a rate. A very slow run's ETA stays text, never an overflow."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    if seconds >= MAX_ETA_DAYS * 86400:
        return f"more than {MAX_ETA_DAYS} days"
    return str(timedelta(seconds=round(seconds)))


class FinalLoraHook(export.CheckpointHook):
    """Checkpoints as the nodes write them; the finished LoRA goes to `lora_path`, not into ComfyUI's
    loras folder (a command-line run may have none it should write to)."""

    def __init__(self, save: SaveConfig, lora_path: Path, resumed: export.Checkpoint | None = None):
        super().__init__(save, resumed=resumed)
        self.lora_path = lora_path

    def on_end(self, trainer: Trainer, cancelled: bool) -> list[Event]:
        if trainer.state.step < trainer.config.steps:
            return super().on_end(trainer, cancelled)

        def write() -> list[Event]:
            export.write_lora(self.lora_path, trainer, self.save, self.started_at)
            return [Event("saved", {"kind": "lora", "path": str(self.lora_path), "step": trainer.state.step})]

        return self._write_final(trainer, write)


def dataset_configs(config: ResolvedConfig) -> Datasets:
    """The `datasets:` entries. The process's trigger word goes to every dataset but the regularisation
    ones, which train the class without it; with train.diff_output_preservation, every dataset with the
    trigger word preserves the class."""
    values = config.values
    preserve = values["train"]["diff_output_preservation"]
    if preserve and not values["trigger_word"].strip():
        raise config.error("train.diff_output_preservation", "replaces the trigger word by the class word: "
                           "set trigger_word too")
    members = []
    for index, entry in enumerate(values["datasets"]):
        extra = {}
        if entry["is_reg"]:
            extra = {"trigger_word": "", "preservation_class": ""}
        elif not preserve:
            extra = {"preservation_class": ""}
        members.append(build(config, DatasetConfig, dataset_keys(index), **extra))
    return Datasets(tuple(members))


def train(config: ResolvedConfig, resume: bool, command: str) -> int:
    """Trains as `config` says; returns the exit code. `command` is how to resume, told after Ctrl-C.
    Under torchrun, every process runs this; only the first writes files and shows progress."""
    rank, world_size = distributed.world()
    if world_size == 1:
        return train_process(config, resume, command, rank=0, trainer_class=Trainer)
    distributed.start(comfy.model_management.get_torch_device().type)
    try:
        return train_process(config, resume, command, rank, trainer_class=distributed.ShardedTrainer)
    finally:
        distributed.stop()


def train_process(config: ResolvedConfig, resume: bool, command: str, rank: int, trainer_class) -> int:
    values = config.values
    lora = build(config, LoraConfig, LORA_KEYS, text_encoders=text_encoders_of(config))
    ema = values["train"]["ema_config"]
    train_config = build(config, TrainConfig, TRAIN_KEYS, ema_decay=ema["ema_decay"] if ema["use_ema"] else 0.0)
    save = build(config, SaveConfig, SAVE_KEYS)
    with named_in_file(config, SAVE_KEYS):
        export.check_text_encoder_format(lora, save)
    datasets = dataset_configs(config)
    with named_in_file(config, SAVE_KEYS):
        check_save_format(lora, save)
    # Before the models load: a missing checkpoint should not cost their loading time.
    checkpoint = export.find_checkpoint(export.checkpoints_folder(save)) if resume else None
    models = load_models(config)
    scheduler = values["train"]["noise_scheduler"]
    if scheduler and scheduler != NOISE_SCHEDULER_OF[models.family]:
        log.warning("%s: %r is ignored; %s trains with %s", config.where("train.noise_scheduler"), scheduler,
                    models.family, NOISE_SCHEDULER_OF[models.family])
    settings = sample_settings(config, models)
    run_folder = Path(save.output_dir) / save.name
    first = rank == 0
    # The previews' prompts are encoded before the dataset, which takes the text encoders and the VAE off
    # the card when it is done: nothing loads them again before training (sampling loads the VAE alone).
    encoded = encode_prompts(models.clip, settings) if first and settings is not None else None
    # The first process fills the dataset cache; the others then read it from there.
    if not first:
        distributed.barrier()
    with tempfile.TemporaryDirectory(prefix="lora-train-cache-") as scratch:
        # Datasets that are not cached on disk cache into a folder that goes when the run ends.
        datasets = Datasets(tuple(dataset if entry["cache_latents_to_disk"] else replace(dataset, cache_dir=scratch)
                                  for dataset, entry in zip(datasets.members, values["datasets"], strict=True)))
        # An error of one dataset names its files; with one dataset, also its line in the file.
        keys = dataset_keys(0) if len(datasets.members) == 1 else PROCESS_DATASET_KEYS
        with named_in_file(config, keys):
            samples, report = build_samples(datasets, models.patcher, models.clip, models.vae, config.file.parent,
                                            save.output_dir, train_text_encoders=bool(lora.trained_text_encoders))
    save = replace(save, dataset=report.facts())
    if first:
        distributed.barrier()
    with named_in_file(config, LORA_KEYS | TRAIN_KEYS):
        trainer = trainer_class(models.patcher, samples, lora, train_config, clip=models.clip)
    resumed = None
    if checkpoint is not None:
        try:
            resumed = export.resume(trainer, checkpoint)
        except ValueError as error:
            raise config.error("name", f"--resume: {error}") from None
    hooks = []
    if first:
        hooks += validation_hooks(report.validation, train_config)
        hooks.append(FinalLoraHook(save, run_folder / f"{save.name}.safetensors", resumed))
        if encoded is not None:
            every = values["sample"]["sample_every"]
            hooks.append(SampleHook(models.vae, encoded, settings, every, run_folder / "samples", clip=models.clip))
    return watch(TrainingJob(trainer, hooks), command, show=first)


def watch(job: TrainingJob, command: str, show: bool = True) -> int:
    """Shows the job's events (with `show`) until it ends. Ctrl-C cancels it: the checkpoint hook
    saves the last whole step, and the exit code is 130."""
    progress = TerminalProgress() if show else None
    started_at = time.perf_counter()
    checkpoint = ""
    with job:
        while True:
            try:
                for event in job.events():
                    if progress is not None:
                        progress.show(event)
                    if event.kind == "saved" and event.data["kind"] == "checkpoint":
                        checkpoint = event.data["path"]
                break
            except KeyboardInterrupt:
                log.warning("interrupted: stopping after this step and saving a checkpoint")
                job.cancel()
    try:
        job.result()
    except TrainingFailed as error:
        if isinstance(error.__cause__, OutOfMemory):
            # The job logged what was saved and what to lower; after lowering it, this continues.
            log.error("Continue with: %s", command)
        else:
            log.error("%s", error)
        return EXIT_FAILED
    # A cancel that lands on the last step still finished the run.
    step = job.trainer.state.step
    if step < job.trainer.config.steps:
        log.warning("stopped at step %d; checkpoint %s. Continue with: %s", step, checkpoint, command)
        return EXIT_INTERRUPTED
    log.info("finished at step %d in %.0f s", step, time.perf_counter() - started_at)
    return 0
