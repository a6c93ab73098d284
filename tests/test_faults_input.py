"""Hostile and clumsy input, each attack made for real (issue 14, rows 5 and 7 to 11): damaged dataset cache
entries in a real cache folder, caption text kept out of `output/`, save requests and bad bodies sent to a live
headless ComfyUI over HTTP, and broken or malicious configs given to `lora-train` as a real subprocess."""

import json
import logging
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import graph_data
import pytest
import safetensors
import safetensors.torch
import torch
import yaml
from conftest import COMFY_HOST, REPO_ROOT
from live_server import ComfyServer
from test_cli import line_of, short_form
from test_data import CountingCLIP, CountingVAE
from test_graph import tiny_loader, training_graph, unique
from tiny_encoders import build_clip, build_vae
from tiny_models import MODEL_FACTORIES

from trainer_core import cli
from trainer_core.data import DEFAULT_CACHE_FOLDER, DatasetConfig, build_samples, content_hash
from trainer_core.export import list_checkpoints
from trainer_core.headless import TerminalProgress
from trainer_core.job import Event

# -- row 5: a damaged cache entry is a cache miss ------------------------------------------------------------


def build_sdxl(dataset: Path, output: Path):
    """Samples of `dataset` for the tiny SDXL, cached under `output`; and the counting encoders."""
    patcher, clip, vae = MODEL_FACTORIES["sdxl_eps"](), CountingCLIP(build_clip("sdxl")), CountingVAE(build_vae(4))
    config = DatasetConfig(folder=str(dataset), resolution=64)
    samples, report = build_samples(config, patcher, clip, vae, input_dir=dataset, output_dir=output)
    return {sample.key: sample for sample in samples}, report, clip, vae


def test_a_damaged_cache_entry_is_computed_again_with_a_warning_naming_it(tmp_path, caplog):
    dataset = graph_data.write_dataset(tmp_path / "dataset", count=3)
    output = tmp_path / "output"
    first, _, _, _ = build_sdxl(dataset, output)
    latents = sorted((output / DEFAULT_CACHE_FOLDER / "latents").glob("*.safetensors"))
    texts = sorted((output / DEFAULT_CACHE_FOLDER / "text").glob("*.safetensors"))
    assert len(latents) == 3 and len(texts) == 3

    # Swapped files: two sound entries, each in the other's place.
    swapped = latents[0].read_bytes()
    latents[0].write_bytes(latents[1].read_bytes())
    latents[1].write_bytes(swapped)
    # One flipped byte in the tensor data (the file's last byte).
    damaged = bytearray(latents[2].read_bytes())
    damaged[-1] ^= 0x5A
    latents[2].write_bytes(bytes(damaged))
    # A tensor missing, the header otherwise as the cache writes it.
    with safetensors.safe_open(str(texts[0]), framework="pt") as file:
        metadata = file.metadata()
        cond = {"cond": file.get_tensor("cond")}
    safetensors.torch.save_file(cond, str(texts[0]), metadata | {"sha256": content_hash(cond)})
    # A folder in the entry's place, and a file cut short (unreadable as safetensors).
    texts[1].unlink()
    (texts[1] / "inside").mkdir(parents=True)
    texts[2].write_bytes(texts[2].read_bytes()[:40])

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="trainer_core.data"):
        second, report, clip, vae = build_sdxl(dataset, output)
    assert (vae.encoded, clip.encoded) == (3, 3), "every damaged entry is computed again"
    assert (report.latents_cached, report.captions_cached) == (0, 0)
    for path, problem in [(latents[0], "holds another entry's tensors"), (latents[1], "holds another entry's tensors"),
                          (latents[2], "does not match its content hash"), (texts[0], "holds cond, not cond, pooled"),
                          (texts[1], "is not a file"), (texts[2], "is unreadable")]:
        assert f"cache entry {path} (" in caplog.text and problem in caplog.text, (path, problem, caplog.text)
    assert "00_red_circle.png" in caplog.text, "a latent entry's warning names its image"
    for key, sample in first.items():
        assert torch.equal(second[key].latents, sample.latents), f"{key} trained on another image's latents"
        assert all(torch.equal(second[key].conditioning[k], v) for k, v in sample.conditioning.items())

    # Rewritten: the next run reads every entry from the cache.
    third, report, clip, vae = build_sdxl(dataset, output)
    assert (vae.encoded, clip.encoded) == (0, 0) and (report.latents_cached, report.captions_cached) == (3, 3)
    assert all(torch.equal(third[key].latents, sample.latents) for key, sample in first.items())


# -- row 7: no caption text under output/ --------------------------------------------------------------------


def test_no_caption_text_lands_in_the_cache_even_through_a_symlink_out_of_the_dataset(tmp_path):
    dataset = graph_data.write_dataset(tmp_path / "dataset", count=2)
    secret = "private notes 7f3a: the password is hunter2"
    outside = tmp_path / "elsewhere" / "notes.txt"
    outside.parent.mkdir()
    outside.write_text(secret)
    (caption,) = [p for p in dataset.glob("00_*.txt")]
    caption.unlink()
    caption.symlink_to(outside)
    output = tmp_path / "output"
    samples, report, _, _ = build_sdxl(dataset, output)
    assert report.captions[caption.with_suffix(".png").name] == [(1.0, secret)], "the linked caption is trained on"

    written = [p for p in output.rglob("*") if p.is_file()]
    assert len([p for p in written if p.parent.name == "text"]) == 2
    for word in ("hunter2", "7f3a", "a green square"):
        assert not [p for p in written if word.encode() in p.read_bytes()], f"{word!r} is stored under output/"
