"""ComfyUI entry point of the LoRA trainer node pack."""

from comfy_api.latest import ComfyExtension, io

WEB_DIRECTORY = "./web"


class LoraTrainerExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        # Imported when ComfyUI asks, not at import time: pytest imports this file on its own
        # (outside any package) because the repository root is the pack's folder.
        from .nodes.compat import add_routes
        from .nodes.dataset import DatasetNode
        from .nodes.live_runs import register_routes
        from .nodes.load_base_model import LoadBaseModelNode
        from .nodes.lora_config import LoraConfigNode
        from .nodes.sample_preview import SamplePreviewNode
        from .nodes.train_lora import TrainLoraNode

        add_routes(register_routes)
        return [LoadBaseModelNode, DatasetNode, LoraConfigNode, TrainLoraNode, SamplePreviewNode]


async def comfy_entrypoint() -> LoraTrainerExtension:
    return LoraTrainerExtension()
