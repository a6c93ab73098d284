from comfy_api.latest import io

from ..trainer_core.data import DatasetConfig
from .compat import ADVANCED
from .lora_config import CATEGORY


class DatasetNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LoraTrainer_Dataset",
            display_name="Dataset",
            category=CATEGORY,
            description="A folder of images (png, jpg, webp) with same-name .txt captions; subfolders named "
                        "N_name repeat N times. Latents and text embeddings are cached for later runs.",
            inputs=[
                io.String.Input("folder", default="my_dataset",
                                tooltip="Absolute path, or a folder inside ComfyUI's input folder."),
                io.Int.Input("resolution", default=1024, min=64, max=4096, step=64,
                             tooltip="Training side length; images go to aspect-ratio buckets of about this area."),
                io.String.Input("trigger_word", default="",
                                tooltip="Put in front of every caption that lacks it, and stored in the LoRA file."),
                io.String.Input("default_caption", default="", tooltip="Caption of images without a caption file."),
                io.Float.Input("caption_dropout", default=0.05, min=0.0, max=0.95, step=0.01,
                               tooltip="Probability of training on an empty caption instead."),
                io.Boolean.Input("shuffle_tags", default=False,
                                 tooltip="Shuffle comma-separated tags of the captions.", **ADVANCED),
                io.Int.Input("keep_tags", default=1, min=0, max=100,
                             tooltip="Leading tags kept in place when shuffling.", **ADVANCED),
                io.Boolean.Input("flip", default=False,
                                 tooltip="Also train on mirrored images (not for text or asymmetric subjects)."),
            ],
            outputs=[io.Custom("LORA_DATASET").Output(display_name="dataset")],
        )

    @classmethod
    def execute(cls, folder, resolution, trigger_word, default_caption, caption_dropout, shuffle_tags, keep_tags,
                flip) -> io.NodeOutput:
        config = DatasetConfig(
            folder=folder, resolution=resolution, trigger_word=trigger_word.strip(), default_caption=default_caption,
            caption_dropout=caption_dropout, shuffle_tags=shuffle_tags, keep_tags=keep_tags, flip=flip,
        )
        return io.NodeOutput(config)
