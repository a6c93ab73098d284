"""Test session setup: a real ComfyUI host imported as a library in CPU mode.

The import happens when pytest loads this file, before any test module, so tests can
`import comfy...`, `import folder_paths` and `import trainer_core` at top level.
"""

import os
import sys
from pathlib import Path

import pytest
import torch

# The tiny test models make many small ops; a second OpenMP thread only spin-waits against the
# live server and other processes (10x slower steps were seen on 2 busy cores).
torch.set_num_threads(1)

REPO_ROOT = Path(__file__).resolve().parents[1]


def resolve_comfy_host() -> Path:
    host = Path(os.environ.get("COMFYUI_PATH") or REPO_ROOT / ".comfyui").resolve()
    if not (host / "comfy" / "cli_args.py").is_file():
        raise pytest.UsageError(
            f"No ComfyUI host at {host}. Run `make host` to provision the pinned ComfyUI 0.3.75, "
            "or point COMFYUI_PATH at a ComfyUI checkout."
        )
    return host


COMFY_HOST = resolve_comfy_host()

# The host goes first: ComfyUI imports its own top-level `nodes` module, which this pack's
# `nodes/` package would otherwise shadow. The repo root comes right after it, for `trainer_core`.
for entry in (REPO_ROOT, COMFY_HOST):
    if str(entry) in sys.path:
        sys.path.remove(str(entry))
    sys.path.insert(0, str(entry))

import comfy.options  # noqa: E402

# ComfyUI parses sys.argv only when asked to (main.py asks); pytest's argv must stay unparsed.
comfy.options.enable_args_parsing(False)

from comfy.cli_args import args  # noqa: E402

# Must be set before comfy.model_management is imported: it picks the device at import time.
args.cpu = True

import comfy.model_management  # noqa: E402
import folder_paths  # noqa: E402

assert comfy.model_management.cpu_state == comfy.model_management.CPUState.CPU, "ComfyUI did not start in CPU mode"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--run-slow", action="store_true", default=False, help="also run tests marked slow (full-size models)"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--run-slow"):
        return
    skip_slow = pytest.mark.skip(reason="slow: run with --run-slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip_slow)


@pytest.fixture(scope="session")
def comfy_host() -> Path:
    """The ComfyUI checkout the tests run against."""
    return COMFY_HOST


@pytest.fixture(scope="session", autouse=True)
def comfy_dirs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Redirects ComfyUI's models/output/input/temp/user folders into a session temp dir.

    Returns the root that holds them; models live in `<root>/models/<folder>`, as in a host.
    """
    root = tmp_path_factory.mktemp("comfyui")
    host_models = Path(folder_paths.models_dir)
    models = root / "models"
    for name, (paths, extensions) in list(folder_paths.folder_names_and_paths.items()):
        moved = [str(models / Path(p).relative_to(host_models)) for p in paths if Path(p).is_relative_to(host_models)]
        if moved:
            folder_paths.folder_names_and_paths[name] = (moved, extensions)
            for path in moved:
                os.makedirs(path, exist_ok=True)
    folder_paths.models_dir = str(models)
    for name, setter in (
        ("output", folder_paths.set_output_directory),
        ("input", folder_paths.set_input_directory),
        ("temp", folder_paths.set_temp_directory),
        ("user", folder_paths.set_user_directory),
    ):
        (root / name).mkdir()
        setter(str(root / name))
    folder_paths.filename_list_cache.clear()
    return root


# Fixtures of the other test helpers, registered here so every test module can request them.
from live_server import comfy_server  # noqa: E402, F401
