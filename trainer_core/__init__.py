"""The LoRA training engine: importable and testable without a running ComfyUI server."""
