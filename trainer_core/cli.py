"""`lora-train [train] CONFIG.yaml` (also `python -m trainer_core train CONFIG.yaml`): headless training;
`torchrun --nproc_per_node N -m trainer_core train CONFIG.yaml` trains data-parallel (see distributed.py).

ComfyUI is used as a library, as the nodes use it: it is found, put on sys.path and imported (in CPU
mode with `--cpu`, with ComfyUI's own memory options `--lowvram`, `--novram`, `--reserve-vram GB` and
`--cuda-device N`) before any module of the engine that imports it; until then only the YAML is read.
Exit codes: 0 trained, 1 training failed, 2 the config is wrong, 130 interrupted (Ctrl-C).
"""

import argparse
import logging
import os
import re
import sys
from pathlib import Path

import yaml

from . import yaml_config

log = logging.getLogger(__name__)

PACK_ROOT = Path(__file__).absolute().parents[1]
EXIT_FAILED, EXIT_CONFIG, EXIT_INTERRUPTED = 1, 2, 130


def find_comfyui() -> Path:
    """COMFYUI_PATH; else the ComfyUI this pack is installed in (`<ComfyUI>/custom_nodes/<pack>`);
    else the development host that `make host` provisions in `.comfyui/`."""
    if os.environ.get("COMFYUI_PATH"):
        candidates = [Path(os.environ["COMFYUI_PATH"]).expanduser()]
    else:
        packs = {PACK_ROOT, PACK_ROOT.resolve()}
        candidates = [pack.parents[1] for pack in packs if pack.parent.name == "custom_nodes"]
        candidates.append(PACK_ROOT / ".comfyui")
    for host in candidates:
        if (host / "comfy" / "cli_args.py").is_file():
            return host.resolve()
    raise FileNotFoundError(
        f"no ComfyUI found (looked in {', '.join(map(str, candidates))}): set COMFYUI_PATH to a ComfyUI folder"
    )


def comfyui_version(host: Path) -> str:
    """The host's version, as its comfyui_version.py gives it ("0.3.75")."""
    return re.search(r'__version__\s*=\s*"([^"]+)"', (host / "comfyui_version.py").read_text()).group(1)


def import_comfyui(cpu: bool, lowvram: bool = False, novram: bool = False, reserve_vram: float | None = None,
                   cuda_device: int | None = None) -> Path:
    """Puts the host first on sys.path (this pack's `nodes` package must not shadow ComfyUI's `nodes`
    module) and imports ComfyUI's device management, on the CPU if asked, else on the device it picks
    (`cuda_device`: that GPU alone), with ComfyUI's memory options of the same names: `lowvram` and
    `novram` load the model in parts, `reserve_vram` (GB) is kept free of ComfyUI's models."""
    host = find_comfyui()
    if cuda_device is not None:
        # As ComfyUI's main.py does it: before torch starts CUDA, which reads these once.
        for variable in ("CUDA_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES", "ASCEND_RT_VISIBLE_DEVICES"):
            os.environ[variable] = str(cuda_device)
    rank_gpu = os.environ.get("LOCAL_RANK")
    if rank_gpu is not None and not cpu:
        # Under torchrun each process trains on its own GPU, which ComfyUI then sees as its only one.
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        os.environ["CUDA_VISIBLE_DEVICES"] = visible.split(",")[int(rank_gpu)] if visible else rank_gpu
    if str(host) in sys.path:
        sys.path.remove(str(host))
    sys.path.insert(0, str(host))
    import comfy.options

    comfy.options.enable_args_parsing(False)  # ComfyUI must not parse this command's arguments
    from comfy.cli_args import args

    options = {"lowvram": lowvram, "novram": novram, "reserve_vram": reserve_vram, "cuda_device": cuda_device}
    given = [name for name, value in options.items() if value is not None and value is not False]
    if given and "comfy.model_management" in sys.modules:
        log.warning("ComfyUI was imported before: %s only take effect in a new process", ", ".join(given))
    # Read when comfy.model_management is first imported, which picks the device and memory mode then.
    args.cpu = args.cpu or cpu
    args.lowvram = args.lowvram or lowvram
    args.novram = args.novram or novram
    if reserve_vram is not None:
        args.reserve_vram = reserve_vram
    import comfy.model_management  # noqa: F401

    return host


def parse_arguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="lora-train", usage="lora-train [train] CONFIG.yaml [options]",
        description="Train a LoRA (SDXL, SD 3.5, Flux) from an ai-toolkit style YAML file, with ComfyUI's loaders.",
    )
    parser.add_argument("config", type=Path, help="the YAML file (ai-toolkit's job/config/process form, or short)")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint of this name")
    parser.add_argument("--strict", action="store_true", help="unknown keys are errors, not warnings")
    parser.add_argument("--cpu", action="store_true", help="run ComfyUI on the CPU")
    # ComfyUI's own memory options, as its server takes them.
    vram = parser.add_mutually_exclusive_group()
    vram.add_argument("--lowvram", action="store_true", help="ComfyUI loads the model in parts where it does not fit")
    vram.add_argument("--novram", action="store_true", help="ComfyUI keeps the model's weights in CPU memory")
    parser.add_argument("--reserve-vram", type=float, metavar="GB",
                        help="GB of GPU memory ComfyUI keeps free (for other programs, or to offload as a smaller "
                             "card would)")
    parser.add_argument("--cuda-device", type=int, metavar="N", help="train on GPU N alone")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    # `train` is the only command; it may be named, as in `python -m trainer_core train CONFIG.yaml`.
    arguments = parser.parse_args(argv[1:] if argv[:1] == ["train"] else argv)
    if arguments.reserve_vram is not None and not arguments.reserve_vram >= 0:
        parser.error(f"--reserve-vram: give the GB to keep free, 0 or more, not {arguments.reserve_vram}")
    if arguments.cuda_device is not None:
        if arguments.cuda_device < 0:
            parser.error(f"--cuda-device: give a GPU's index, 0 or more, not {arguments.cuda_device}")
        if "LOCAL_RANK" in os.environ:
            parser.error("--cuda-device: under torchrun each process trains on its own GPU; choose the GPUs with "
                         "CUDA_VISIBLE_DEVICES instead")
    return arguments


def memory_options(arguments: argparse.Namespace) -> dict:
    """ComfyUI's memory options as given on the command line, by import_comfyui's parameter names."""
    return {name: getattr(arguments, name) for name in ("lowvram", "novram", "reserve_vram", "cuda_device")}


def main(argv: list[str] | None = None) -> int:
    arguments = parse_arguments(sys.argv[1:] if argv is None else argv)
    # Under torchrun only the first process tells what happens; the others report problems.
    level = logging.INFO if os.environ.get("RANK", "0") == "0" else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(message)s", stream=sys.stderr)
    try:
        config = yaml_config.load(arguments.config, strict=arguments.strict)
    except yaml_config.ConfigFileError as error:
        log.error("%s", error)
        return EXIT_CONFIG
    if arguments.print_config:
        sys.stdout.write(yaml.safe_dump(config.values, sort_keys=False))
        return 0
    try:
        log.info("ComfyUI: %s", import_comfyui(arguments.cpu, **memory_options(arguments)))
        from . import headless

        return headless.train(config, resume=arguments.resume, command=resume_command(arguments))
    except KeyboardInterrupt:
        log.error("interrupted before training started; nothing was saved")
        return EXIT_INTERRUPTED
    except (FileNotFoundError, yaml_config.ConfigError) as error:
        log.error("%s", error)
        return EXIT_CONFIG


def resume_command(arguments: argparse.Namespace) -> str:
    """The command line that continues this run, with the same options."""
    options = "".join(f" --{name}" for name in ("strict", "cpu", "lowvram", "novram") if getattr(arguments, name))
    for name in ("reserve_vram", "cuda_device"):
        if getattr(arguments, name) is not None:
            options += f" --{name.replace('_', '-')} {getattr(arguments, name):g}"
    return f"lora-train train {arguments.config}{options} --resume"
