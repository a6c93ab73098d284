"""ComfyUI entry point of the LoRA trainer node pack."""

from comfy_api.latest import ComfyExtension, io

from .nodes.lora_config import LoraConfigNode

WEB_DIRECTORY = "./web"


class LoraTrainerExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [LoraConfigNode]


async def comfy_entrypoint() -> LoraTrainerExtension:
    return LoraTrainerExtension()
