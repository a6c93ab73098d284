"""Node-API differences between the supported ComfyUI versions, in one place."""

import inspect

from comfy_api.latest import io

# `advanced=True` folds an input away in newer frontends; ComfyUI 0.3.75's inputs do not take it.
ADVANCED = {"advanced": True} if "advanced" in inspect.signature(io.Float.Input.__init__).parameters else {}
