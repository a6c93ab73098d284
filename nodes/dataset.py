from comfy_api.latest import io

from ..trainer_core.data import MAX_LOSS_WEIGHT, DatasetConfig, Datasets
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
                        "N_name repeat N times. Latents and text embeddings are cached for later runs. Chain "
                        "Dataset nodes through their dataset input to train on several datasets at once.",
            inputs=[
                io.Custom("LORA_DATASET").Input("dataset", optional=True,
                                                tooltip="Datasets to train beside this one (another Dataset "
                                                        "node's output); this one is added to them."),
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
                io.Int.Input("repeats", optional=True, default=1, min=1, max=10_000,
                             tooltip="How often each image counts per epoch, times its N_name folder's N: "
                                     "sets this dataset's share of the batches."),
                io.String.Input("mask_folder", optional=True, default="",
                                tooltip="Folder of grey-scale masks named as the images (white trains, black is "
                                        "left out of the loss); absolute or inside the input folder. Empty: none."),
                io.Boolean.Input("alpha_mask", optional=True, default=False,
                                 tooltip="Use each image's alpha channel as its mask (transparent is left out)."),
                io.Boolean.Input("regularization", optional=True, default=False,
                                 tooltip="Regularisation images of the class: trained without the trigger word, "
                                         "their loss times loss_weight.", **ADVANCED),
                io.Float.Input("loss_weight", optional=True, default=1.0, min=0.01, max=MAX_LOSS_WEIGHT, step=0.05,
                               tooltip="Multiplies the loss of this dataset's images.", **ADVANCED),
                io.String.Input("preservation_class", optional=True, default="",
                                tooltip="Differential output preservation: the class word (e.g. 'person') that "
                                        "replaces the trigger word; the LoRA's output for it is held to the base "
                                        "model's. Costs two more forward passes per step. Empty: off.",
                                **ADVANCED),
                io.Float.Input("preservation_weight", optional=True, default=1.0, min=0.01, max=MAX_LOSS_WEIGHT,
                               step=0.05, tooltip="Weight of the preservation term.", **ADVANCED),
                io.Float.Input("validation_split", optional=True, default=0.0, min=0.0, max=0.5, step=0.05,
                               tooltip="Fraction of the images held out of training for the validation loss "
                                       "(0: none).", **ADVANCED),
                io.String.Input("validation_folder", optional=True, default="",
                                tooltip="Or a folder of held-out images (absolute, or inside ComfyUI's input "
                                        "folder) for the validation loss; empty: none.", **ADVANCED),
            ],
            outputs=[io.Custom("LORA_DATASET").Output(display_name="dataset")],
        )

    @classmethod
    def execute(cls, folder, resolution, trigger_word, default_caption, caption_dropout, shuffle_tags, keep_tags,
                flip, dataset=None, **options) -> io.NodeOutput:
        # The inputs added with several datasets are optional, so graphs saved before them still run; each is
        # named as its DatasetConfig field, whose default stands in where a graph lacks it.
        options = {name: value.strip() if isinstance(value, str) else value for name, value in options.items()}
        config = DatasetConfig(
            folder=folder, resolution=resolution, trigger_word=trigger_word.strip(), default_caption=default_caption,
            caption_dropout=caption_dropout, shuffle_tags=shuffle_tags, keep_tags=keep_tags, flip=flip, **options,
        )
        # The chained datasets come first, in the order they were chained.
        return io.NodeOutput(Datasets.of(dataset).plus(config) if dataset is not None else Datasets((config,)))
