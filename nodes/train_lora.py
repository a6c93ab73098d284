import dataclasses
import time

import comfy.model_management
import comfy.utils
import folder_paths
import torch
from comfy_api.latest import io
from PIL import Image

from ..trainer_core import export
from ..trainer_core.config import (
    BLOCKS_TO_SWAP_AUTO,
    COMPILE_MODES,
    MAX_BLOCKS_TO_SWAP,
    MAX_LEARNING_RATE,
    MAX_LORAPLUS_RATIO,
    MAX_STEPS,
    OPTIMIZERS,
    PRECISIONS,
    SAVE_FORMATS,
    SCHEDULES,
    SaveConfig,
    TrainConfig,
    check_save_format,
)
from ..trainer_core.data import build_samples
from ..trainer_core.ema import ema_weights
from ..trainer_core.job import TrainingJob
from ..trainer_core.sampling import SampleHook, SampleSettings, encode_prompts
from ..trainer_core.trainer import Trainer
from ..trainer_core.validation import validation_hooks
from .compat import ADVANCED, send_event
from .live_runs import RUNS, RunRecord
from .lora_config import CATEGORY
from .sample_preview import prompt_lines

PREVIEW_SIDE = 512


class TrainLoraNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LoraTrainer_TrainLoRA",
            display_name="Train LoRA",
            category=CATEGORY,
            description="Trains a LoRA on a dataset; shows loss and samples while it runs, saves it into the loras "
                        "folder and returns the model (and CLIP) with the LoRA applied.",
            is_output_node=True,
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model (ComfyUI MODEL)."),
                io.Clip.Input("clip", tooltip="The text encoders (ComfyUI CLIP)."),
                io.Vae.Input("vae", tooltip="The VAE (ComfyUI VAE)."),
                io.Custom("LORA_DATASET").Input("dataset", tooltip="From the Dataset node."),
                io.Custom("LORA_CONFIG").Input("lora_config", tooltip="From the LoRA Config node."),
                io.String.Input("output_name", default="my_lora",
                                tooltip="Name of the LoRA file and of its folder under loras/ and output/."),
                io.Int.Input("steps", default=1000, min=1, max=MAX_STEPS, tooltip="Optimizer steps to train."),
                io.Float.Input("learning_rate", default=1e-4, min=1e-7, max=MAX_LEARNING_RATE, step=1e-5,
                               tooltip="Peak learning rate (Prodigy: use 1.0)."),
                io.Combo.Input("optimizer", options=list(OPTIMIZERS), default="adamw8bit",
                               tooltip="adamw8bit keeps optimizer state in 8 bits (bitsandbytes)."),
                io.Combo.Input("schedule", options=list(SCHEDULES), default="constant_with_warmup",
                               tooltip="How the learning rate changes over the run."),
                io.Int.Input("warmup_steps", default=50, min=0, max=100_000, tooltip="Steps of linear warm-up."),
                io.Int.Input("batch_size", default=1, min=1, max=64, tooltip="Images per micro-batch."),
                io.Int.Input("gradient_accumulation", default=1, min=1, max=256,
                             tooltip="Micro-batches per optimizer step.", **ADVANCED),
                io.Combo.Input("precision", options=list(PRECISIONS), default="bf16",
                               tooltip="Compute precision (fp16 uses a gradient scaler)."),
                io.Boolean.Input("gradient_checkpointing", default=True,
                                 tooltip="Recompute each block in backward: much less memory, ~30% slower."),
                # A training run is repeated to resume or compare, never to reroll: no randomize widget.
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFF, control_after_generate=False,
                             tooltip="Seed of noise, timesteps and data order."),
                io.Int.Input("save_every", default=250, min=0, max=1_000_000,
                             tooltip="Save a resumable checkpoint every N steps (0: only at the end or on Cancel)."),
                io.Int.Input("keep_last", default=3, min=0, max=1000,
                             tooltip="Checkpoints kept (0 keeps all).", **ADVANCED),
                io.Combo.Input("save_dtype", options=["bf16", "fp16", "fp32"], default="bf16",
                               tooltip="Precision of the saved LoRA.", **ADVANCED),
                io.Int.Input("sample_every", default=250, min=0, max=1_000_000,
                             tooltip="Preview images every N steps (0: only at the end)."),
                io.String.Input("sample_prompts", multiline=True, default="",
                                tooltip="One prompt per line for the previews; empty: no previews."),
                io.Int.Input("sample_seed", default=42, min=0, max=0xFFFFFFFF, control_after_generate=False,
                             tooltip="Seed of the previews."),
                io.Int.Input("sample_size", default=1024, min=64, max=4096, step=64,
                             tooltip="Side of the square previews in pixels."),
                io.String.Input("resume_from", default="",
                                tooltip="A checkpoint folder to continue from (relative: inside the output "
                                        "folder), or 'latest' for this output name's newest; empty starts fresh."),
                io.Combo.Input("compile_blocks", options=list(COMPILE_MODES), default="auto",
                               tooltip="torch.compile each block on a GPU; the first step then compiles for "
                                       "minutes. auto: SD3 and Flux; on: also SDXL (4-5 minutes of compiling, "
                                       "for long runs); off: never.", **ADVANCED),
                io.Combo.Input("save_format", options=list(SAVE_FORMATS), default="comfyui",
                               tooltip="Key names in the LoRA file. comfyui: kohya's, read by ComfyUI, A1111 and "
                                       "Forge; diffusers reads them too, but not SD 3.5's, nor SDXL's with "
                                       "attention+mlp+conv. diffusers: diffusers' own, read by diffusers and "
                                       "ComfyUI.", **ADVANCED),
                io.Int.Input("blocks_to_swap", default=BLOCKS_TO_SWAP_AUTO, min=BLOCKS_TO_SWAP_AUTO,
                             max=MAX_BLOCKS_TO_SWAP,
                             tooltip="Blocks of the model kept in system memory and copied to the card just before "
                                     "they compute, for cards too small for the model. -1 (auto): none where the "
                                     "model fits the card, else the fewest that fit; 0 keeps all on the card; a "
                                     "count needs gradient_checkpointing.", **ADVANCED),
                io.Int.Input("validation_every", default=0, min=0, max=1_000_000,
                             tooltip="Validation loss on the dataset's held-out images every N steps (0: only at "
                                     "the end); needs the Dataset's validation_split or validation_folder.",
                             optional=True, **ADVANCED),
                io.Float.Input("ema_decay", default=0.0, min=0.0, max=0.99999, step=0.0001,
                               tooltip="EMA of the LoRA weights (e.g. 0.999), used for previews and the saved "
                                       "LoRA; 0: off.", optional=True, **ADVANCED),
                io.Float.Input("loraplus_lr_ratio", default=1.0, min=0.01, max=MAX_LORAPLUS_RATIO, step=0.5,
                               tooltip="LoRA+: the up (B) matrices learn at this multiple of the learning rate "
                                       "(16 is usual); 1: off.", optional=True, **ADVANCED),
                io.Float.Input("text_encoder_lr", default=0.0, min=0.0, max=MAX_LEARNING_RATE, step=1e-6,
                               tooltip="Learning rate of the text encoders' LoRA (LoRA Config's text_encoders); 0 "
                                       "uses learning_rate.", optional=True, **ADVANCED),
            ],
            hidden=[io.Hidden.unique_id],
            outputs=[
                io.Model.Output(display_name="model", tooltip="The input model with the trained LoRA applied."),
                # Any type: ComfyUI refuses a STRING link into a file list (the LoRA Loader's lora_name) at
                # validation, and an output typed as that list goes stale once a run adds a file to it.
                io.AnyType.Output(display_name="lora_name", tooltip="The file name as the LoRA Loader lists it; "
                                  "connect it to a LoRA Loader's lora_name."),
                io.Custom("LORA_LOSS_HISTORY").Output(display_name="loss_history"),
                io.Clip.Output(display_name="clip", tooltip="The input CLIP with the text encoders' LoRA applied "
                               "(as it came in where LoRA Config's text_encoders is none)."),
            ],
        )

    @classmethod
    def execute(cls, model, clip, vae, dataset, lora_config, output_name, steps, learning_rate, optimizer, schedule,
                warmup_steps, batch_size, gradient_accumulation, precision, gradient_checkpointing, seed, save_every,
                keep_last, save_dtype, sample_every, sample_prompts, sample_seed, sample_size,
                resume_from, compile_blocks, save_format, blocks_to_swap, validation_every=0, ema_decay=0.0,
                loraplus_lr_ratio=1.0, text_encoder_lr=0.0) -> io.NodeOutput:
        train = TrainConfig(
            steps=steps, learning_rate=learning_rate, optimizer=optimizer, schedule=schedule,
            warmup_steps=warmup_steps, batch_size=batch_size, gradient_accumulation=gradient_accumulation,
            precision=precision, gradient_checkpointing=gradient_checkpointing, seed=seed,
            compile_blocks=compile_blocks, blocks_to_swap=blocks_to_swap, validation_every=validation_every,
            ema_decay=ema_decay, loraplus_lr_ratio=loraplus_lr_ratio, text_encoder_lr=text_encoder_lr,
        )
        save = SaveConfig(name=output_name.strip(), dtype=save_dtype, every=save_every, keep_last=keep_last,
                          trigger_word=dataset.trigger_word, format=save_format)
        check_save_format(lora_config, save)
        export.check_text_encoder_format(lora_config, save)
        prompts = prompt_lines(sample_prompts)
        settings = None
        if prompts:
            # Before the dataset, which takes the text encoders and the VAE off the card when it is done.
            settings = SampleSettings(prompts, seed=sample_seed, width=sample_size, height=sample_size).resolved(model)
            encoded = encode_prompts(clip, settings)
        samples, report = build_samples(dataset, model, clip, vae, folder_paths.get_input_directory(),
                                        folder_paths.get_output_directory(),
                                        train_text_encoders=bool(lora_config.trained_text_encoders))
        save = dataclasses.replace(save, dataset=report.facts())
        trainer = Trainer(model, samples, lora_config, train, clip=clip)
        resumed = None
        if resume_from.strip():
            # ComfyUI runs nodes under inference mode: optimizer state loaded there would be made of
            # inference tensors, which the training thread cannot update in place.
            with torch.inference_mode(False):
                resumed = export.resume(trainer, export.resume_target(save, resume_from.strip()))
        checkpoints = export.CheckpointHook(save, started_at=time.time(), resumed=resumed)
        hooks = [*validation_hooks(report.validation, train), checkpoints]
        if settings is not None:
            samples_folder = export.checkpoints_folder(save).parent / "samples"
            hooks.append(SampleHook(vae, encoded, settings, sample_every, samples_folder, clip=clip))
        job = TrainingJob(trainer, hooks)
        run = RUNS.add(RunRecord(str(cls.hidden.unique_id), save.name, steps, job,
                                 folder_paths.get_output_directory(), checkpoints))
        cls._watch(job, run)
        with ema_weights(trainer):
            trained = export.apply_lora_to_clone(model, trainer.network)
            trained_clip = export.apply_text_encoder_lora_to_clone(clip, trainer)
        return io.NodeOutput(trained, run.lora_name, run.snapshot()["history"], trained_clip)

    @classmethod
    def _watch(cls, job: TrainingJob, run: RunRecord):
        """Relays the run's events to ComfyUI and the browser's panel until it ends; Cancel (or the
        panel's Stop) stops it at the next step (the checkpoint hook saves it) and is then re-raised,
        as ComfyUI expects."""
        total = run.total_steps
        progress = comfy.utils.ProgressBar(total)

        def show(step: int, preview=None) -> None:
            try:
                progress.update_absolute(step, total, preview)
            except comfy.model_management.InterruptProcessingException:
                # ComfyUI's progress hook raises on Cancel (and clears the flag): stop the run, and
                # keep relaying its events until it has saved.
                job.cancel()

        with job:
            for event in job.events():
                if comfy.model_management.processing_interrupted():
                    job.cancel()
                if event.kind == "step":
                    show(event.data["step"])
                elif event.kind == "sample":
                    image = Image.fromarray((event.data["images"][-1].cpu().numpy() * 255).round().astype("uint8"))
                    show(event.data["step"], ("JPEG", image, PREVIEW_SIDE))
                send_event(event.kind, run.record(event))
        job.result()
        comfy.model_management.throw_exception_if_processing_interrupted()
        # "stopped" also where ComfyUI's own check inside the model took the Cancel first.
        if run.status == "stopped":
            raise comfy.model_management.InterruptProcessingException()
