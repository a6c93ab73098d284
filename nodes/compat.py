"""Node-API differences between the supported ComfyUI versions, in one place."""

import inspect
import sys

from comfy_api.latest import io

# `advanced=True` folds an input away in newer frontends; ComfyUI 0.3.75's inputs do not take it.
ADVANCED = {"advanced": True} if "advanced" in inspect.signature(io.Float.Input.__init__).parameters else {}


def _prompt_server():
    """ComfyUI's running web server; None where ComfyUI is used as a library (no `server` imported)."""
    server = sys.modules.get("server")
    return getattr(getattr(server, "PromptServer", None), "instance", None)


def send_event(kind: str, data: dict) -> None:
    """Sends a training event to every open page as `lora_trainer.<kind>`."""
    server = _prompt_server()
    if server is not None:
        server.send_sync(f"lora_trainer.{kind}", data)


def add_routes(register) -> None:
    """Lets `register` add routes to ComfyUI's web server, where one runs."""
    server = _prompt_server()
    if server is not None:
        register(server.routes)
