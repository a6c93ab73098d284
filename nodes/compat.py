"""Node-API differences between the supported ComfyUI versions, in one place."""

import inspect

import torch
from comfy_api.latest import io

# `advanced=True` folds an input away in newer frontends; ComfyUI 0.3.75's inputs do not take it.
ADVANCED = {"advanced": True} if "advanced" in inspect.signature(io.Float.Input.__init__).parameters else {}


def send_event(event) -> None:
    """Forwards a training event to the browser as `lora_trainer.<kind>`, without its tensors."""
    # Imported here: `server` is ComfyUI's running web server, absent where the pack is imported as a library.
    from server import PromptServer

    data = {key: value for key, value in event.data.items() if not isinstance(value, torch.Tensor)}
    PromptServer.instance.send_sync(f"lora_trainer.{event.kind}", data)
