"""ComfyUI entry point of the LoRA trainer node pack."""

from comfy_api.latest import ComfyExtension, io

from .nodes.dataset import DatasetNode
from .nodes.load_base_model import LoadBaseModelNode
from .nodes.lora_config import LoraConfigNode
from .nodes.sample_preview import SamplePreviewNode
from .nodes.train_lora import TrainLoraNode

WEB_DIRECTORY = "./web"


class LoraTrainerExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [LoadBaseModelNode, DatasetNode, LoraConfigNode, TrainLoraNode, SamplePreviewNode]


async def comfy_entrypoint() -> LoraTrainerExtension:
    return LoraTrainerExtension()
