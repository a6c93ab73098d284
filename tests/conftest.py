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


# The repo root first, for `trainer_core`; import_comfyui then puts the host in front of it, since
# ComfyUI's own top-level `nodes` module must not be shadowed by this pack's `nodes/` package.
if str(REPO_ROOT) in sys.path:
    sys.path.remove(str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT))

from trainer_core.cli import import_comfyui  # noqa: E402

try:
    # COMFYUI_PATH, else the host `make host` provisions; ComfyUI in CPU mode, never parsing pytest's argv.
    COMFY_HOST = import_comfyui(cpu=True)
except FileNotFoundError as error:
    raise pytest.UsageError(f"{error}. Run `make host` to provision the pinned ComfyUI 0.3.75.") from None

import comfy.model_management  # noqa: E402
import folder_paths  # noqa: E402

assert comfy.model_management.cpu_state == comfy.model_management.CPUState.CPU, "ComfyUI did not start in CPU mode"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--run-slow", action="store_true", default=False, help="also run tests marked slow (full-size models)"
    )


# Under pytest-xdist (`--dist loadfile --no-loadscope-reorder`, as `make test` runs it) a worker that runs out of work
# takes the next module in collection order (xdist would otherwise put the modules of most tests first).
# The longest modules (a minute or more of a worker each) go first, so the short ones fill in at the end instead of
# one worker finishing a long module alone.
LONGEST_MODULES = ("test_graph.py", "test_bench.py", "test_cli.py", "test_text_encoder_lora.py", "test_adapters.py",
                   "test_engine.py", "test_extras.py", "test_compile.py", "test_faults_input.py")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("PYTEST_XDIST_WORKER"):
        rank = {name: i for i, name in enumerate(LONGEST_MODULES)}
        items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each module keeps its order
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

    def redirected(path: Path) -> Path | None:
        # Model folders, and any other folder of the host's own (0.33 added `datasets` beside `models`).
        if path.is_relative_to(host_models):
            return models / path.relative_to(host_models)
        return root / path.relative_to(COMFY_HOST) if path.is_relative_to(COMFY_HOST) else None

    for name, (paths, extensions) in list(folder_paths.folder_names_and_paths.items()):
        if name == "custom_nodes":  # the host's installed node packs: read, never written
            continue
        moved = [str(target) for p in paths if (target := redirected(Path(p))) is not None]
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


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny SD3 + CLIP-L + VAE files under `models/`, and a captioned dataset of 64 px images in `data/`: what the
    `lora-train` tests train from (each module writes its own)."""
    root = tmp_path_factory.mktemp("cli_files")
    graph_data.write_sd3_loader_files(root / "models")
    graph_data.write_dataset(root / "data")
    return root


# Fixtures of the other test helpers, registered here so every test module can request them.
import graph_data  # noqa: E402
from live_server import comfy_server  # noqa: E402, F401
