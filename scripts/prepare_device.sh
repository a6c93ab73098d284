#!/usr/bin/env bash
# Builds .device/ (git-ignored): what the GPU machine needs for bench/bench.py and bench/realrun.py and
# lacks, to be named in the device call's `carry`. Its image has torch, transformers, safetensors, numpy, einops, scipy, PIL,
# tqdm, psutil, yaml, aiohttp (see the device's KINDS.md) but no network, so it gets:
#   .device/comfyui.tar.xz  the ComfyUI host (COMFYUI_PATH or .comfyui/; 0.3.75 or newer), without tests, docs,
#                     API nodes, blueprints and the tokenizer data of models we never load (Llama, Qwen, ...),
#                     packed (14 MB as files, 2 MB packed: the repository's raw results share the 64 MiB);
#                     realrun.py starts its server (main.py) with an empty --front-end-root and links the pack into
#                     a custom_nodes folder of its own, so the frontend, template and docs packages are not needed
#   .device/whl/      wheels for Python 3.12 / manylinux x86_64: bitsandbytes (AdamW8bit) cut down to its CPU and
#                     CUDA $BNB_CUDA libraries, torchsde + trampoline (comfy.samplers imports them), and whatever
#                     else the host's requirements.txt asks for that the image lacks, with their dependencies
#                     (av for comfy_api's video types; the database's alembic and SQLAlchemy; pydantic, which the
#                     server's routes import; on 0.33 also comfy-aimdo, comfy-kitchen, blake3, simpleeval).
#                     comfy-kitchen goes without its compiled CUDA and ROCm kernels (57 MB, over the carry
#                     limit): ComfyUI then uses its Triton and eager backends for its own quantized formats,
#                     which the trainer's fp8 weights do not use.
# bench/device_queue.py installs the wheels and unpacks the host on the device (once per machine) and points
# COMFYUI_PATH at the host.
# The device call's working tree (tracked + untracked files + carried folders) must stay under 64 MiB;
# the script prints the total and fails above it.
# Use: scripts/prepare_device.sh   (env: PYTHON, COMFYUI_PATH, BNB_CUDA=130 for torch's cu130 build)
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
HOST=${COMFYUI_PATH:-$ROOT/.comfyui}
OUT=$ROOT/.device
PY=${PYTHON:-$ROOT/.venv/bin/python}
BNB_CUDA=${BNB_CUDA:-130}
LIMIT=$((64 * 1024 * 1024))
# Installed without their dependencies: each would pull in torch.
WHEELS_NO_DEPS=(bitsandbytes==0.50.2 torchsde==0.2.6 trampoline==0.1.2)
# av's newest wheel is 35 MB; this one, which every supported host accepts, is what fits beside the rest.
PINS=(av==18.1.0)
# What the image has (KINDS.md), and what a headless server never imports (the frontend is served empty).
# typing-extensions is carried although the image has one: pydantic asks for a newer one than it may be, and
# the newer one serves the image's packages too.
IMAGE_HAS=(torch torchvision torchaudio numpy einops transformers tokenizers sentencepiece safetensors aiohttp
    yarl pyyaml pillow scipy tqdm psutil filelock requests markupsafe cuda-pathfinder jinja2 networkx sympy mpmath
    fsspec)
NOT_NEEDED=(comfyui-frontend-package comfyui-workflow-templates comfyui-embedded-docs kornia spandrel
    pydantic-settings pyopengl comfy-angle)
listed() {  # listed NAME ITEM...: whether NAME is one of the items
    local name=$1 item
    shift
    for item; do [[ $item == "$name" ]] && return 0; done
    return 1
}

[[ -f $HOST/comfy/cli_args.py ]] || { echo "no ComfyUI at $HOST: run 'make host' or set COMFYUI_PATH" >&2; exit 1; }
[[ -x $PY ]] || PY=python3
grep -qx '.device/' "$ROOT/.gitignore" || echo '.device/' >>"$ROOT/.gitignore"
rm -rf "$OUT"
mkdir -p "$OUT/whl"
download=$(mktemp -d)
staged=$(mktemp -d)
trap 'rm -rf "$download" "$staged"' EXIT

echo "ComfyUI $(cut -d'"' -f2 <(grep __version__ "$HOST/comfyui_version.py")) from $HOST"
excluded=(
    ./.git ./.provisioned-* ./tests ./tests-unit ./script_examples ./comfy_api_nodes ./user ./temp ./output
    ./blueprints ./README.md ./CONTRIBUTING.md ./CODEOWNERS ./QUANTIZATION.md ./AGENTS.md ./openapi.yaml
    # The pack's own link (and whatever else is installed there) stays behind.
    './custom_nodes/*'
    __pycache__ '*.pyc'
)
# Tokenizers of models we never load; SDXL/SD3/Flux need only comfy/sd1_tokenizer (CLIP) and t5_tokenizer.
for tokenizer in "$HOST"/comfy/text_encoders/*_tokenizer; do
    [[ $(basename "$tokenizer") == t5_tokenizer ]] || excluded+=("./comfy/text_encoders/$(basename "$tokenizer")")
done
tar -C "$HOST" "${excluded[@]/#/--exclude=}" -cf - . | tar -C "$staged" -xf -
mkdir -p "$staged/custom_nodes"

# The host's requirements that the image lacks (with their specifiers), skipping comments and markers.
host_wheels=()
while read -r requirement || [[ -n $requirement ]]; do
    name=$(sed -E 's/[<>=~!; \[].*//' <<<"$requirement" | tr 'A-Z_' 'a-z-')
    [[ -z $name ]] || listed "$name" "${IMAGE_HAS[@]}" "${NOT_NEEDED[@]}" "${WHEELS_NO_DEPS[@]%%==*}" && continue
    host_wheels+=("$requirement")
done < <(sed -E 's/#.*//; s/[[:space:]]+$//' "$HOST/requirements.txt")
echo "wheels: ${WHEELS_NO_DEPS[*]} ${PINS[*]} ${host_wheels[*]} (with their dependencies)"
pip_download() {
    "$PY" -m pip download --quiet --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
        -d "$download" "$@" 2> >(grep -v "^WARNING: Location" >&2)
}
pip_download --no-deps "${WHEELS_NO_DEPS[@]}"
pip_download "${PINS[@]}" "${host_wheels[@]}"
for wheel in "$download"/*.whl; do
    name=$(basename "$wheel" | cut -d- -f1 | tr 'A-Z_' 'a-z-')
    case $name in
        bitsandbytes | comfy-kitchen) ;;  # cut down below
        *) listed "$name" "${IMAGE_HAS[@]}" || cp "$wheel" "$OUT/whl/" ;;
    esac
done

# Two wheels are cut down to what the device loads. bitsandbytes ships one 4-26 MB library per CUDA, ROCm and
# XPU version (43 MB in all); torch on the device is a CUDA 13.0 build, and bitsandbytes loads
# libbitsandbytes_cuda<torch.version.cuda>.so. comfy-kitchen's compiled kernels are left out (see the top).
"$PY" - "$OUT/whl" "$BNB_CUDA" "$download"/bitsandbytes-*.whl "$download"/comfy_kitchen-*.whl <<'PYTHON'
import re
import sys
import zipfile
from pathlib import Path

target_dir, cuda = Path(sys.argv[1]), sys.argv[2]
kept_libraries = {"cpu", f"cuda{cuda}"}


def wanted(name: str) -> bool:
    library = re.search(r"libbitsandbytes_(\w+)\.(so|dll|dylib)$", name)
    kitchen_kernels = re.fullmatch(r"comfy_kitchen/backends/\w+/_C\.[\w.]+", name)
    return (library is None or library.group(1) in kept_libraries) and kitchen_kernels is None


for source in map(Path, sys.argv[3:]):
    if not source.is_file():  # the host does not ask for comfy-kitchen (0.3.75)
        continue
    with zipfile.ZipFile(source) as wheel, zipfile.ZipFile(target_dir / source.name, "w", zipfile.ZIP_DEFLATED) as cut:
        names = [info.filename for info in wheel.infolist()]
        if source.name.startswith("bitsandbytes") and not any(
                name.endswith(f"libbitsandbytes_cuda{cuda}.so") for name in names):
            sys.exit(f"{source.name} has no CUDA {cuda} library; set BNB_CUDA to one of its versions")
        for info in wheel.infolist():
            if not wanted(info.filename):
                continue
            data = wheel.read(info)
            if info.filename.endswith(".dist-info/RECORD"):
                # The installer reads RECORD to know the files: list only those still in the wheel.
                lines = [line for line in data.decode().splitlines() if wanted(line.split(",")[0])]
                data = ("\n".join(lines) + "\n").encode()
            cut.writestr(info, data)
PYTHON

# The trimmed host must still import what the bench uses (run on the CPU here).
COMFYUI_PATH=$staged PYTHONDONTWRITEBYTECODE=1 "$PY" - <<'PYTHON'
import os
import sys

sys.path.insert(0, os.environ["COMFYUI_PATH"])
# As main.py does first: ComfyUI's `utils` package, before anything imports comfy/utils.py as a bare `utils`.
import utils.extra_config  # noqa: E402,F401
import comfy.options

comfy.options.enable_args_parsing(False)
from comfy.cli_args import args

args.cpu = True
import comfy.model_management  # noqa: E402,F401
import comfy.samplers  # noqa: E402,F401
import comfy.sd  # noqa: E402,F401
import comfy_api.latest  # noqa: E402,F401
import comfy_extras.nodes_train  # noqa: E402,F401
import server  # noqa: E402,F401  - the real-run bench's node entry runs ComfyUI's own server

print("trimmed host imports: ok")
PYTHON
tar -C "$staged" -cJf "$OUT/comfyui.tar.xz" .

# What the device call sends: tracked and untracked-not-ignored files, plus .device.
repo_bytes=$(cd "$ROOT" && git ls-files -z --cached --others --exclude-standard |
    xargs -0 -r stat -c %s -- 2>/dev/null | awk '{s += $1} END {print s + 0}')
device_bytes=$(find "$OUT" -type f -printf '%s\n' | awk '{s += $1} END {print s + 0}')
total=$((repo_bytes + device_bytes))
mib() { awk -v b="$1" 'BEGIN {printf "%.1f MiB", b / 1048576}'; }
echo "comfyui.tar.xz $(mib "$(stat -c %s "$OUT/comfyui.tar.xz")")"
for wheel in "$OUT"/whl/*.whl; do echo "$(basename "$wheel") $(mib "$(stat -c %s "$wheel")")"; done
echo "carry total: repo $(mib "$repo_bytes") + .device $(mib "$device_bytes") = $(mib "$total") of $(mib "$LIMIT")"
if ((total > LIMIT)); then
    echo "over the device's 64 MiB limit" >&2
    exit 1
fi
