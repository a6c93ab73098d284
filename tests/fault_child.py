"""A second process for tests/test_faults.py, which writes into the same folders as the test.

    python tests/fault_child.py save-loop OUTPUT_DIR NAME SAVES   checkpoints of one run, SAVES times
    python tests/fault_child.py hold PATH                         a LoRA-sized file written to PATH by the
        pack's atomic writer, which stops before its rename: prints "writing" and waits for a line on stdin
"""

import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent
sys.path[:0] = [str(TESTS.parent), str(TESTS)]

from trainer_core.cli import import_comfyui  # noqa: E402

import_comfyui(cpu=True)

import safetensors.torch  # noqa: E402
import torch  # noqa: E402
from tiny_models import MODEL_FACTORIES, random_inputs  # noqa: E402

from trainer_core import export  # noqa: E402
from trainer_core.config import LoraConfig, SaveConfig, TrainConfig  # noqa: E402
from trainer_core.trainer import Sample, Trainer  # noqa: E402


def save_loop(output_dir: str, name: str, saves: int) -> None:
    patcher = MODEL_FACTORIES["sd3"]()
    inputs = random_inputs(patcher, batch=1, latent_hw=(8, 8), seed=1)
    sample = Sample(inputs["x"][0], {"context": inputs["context"][0], "y": inputs["y"][0]})
    trainer = Trainer(patcher, [sample], LoraConfig(rank=2), TrainConfig(steps=saves, precision="fp32"))
    hook = export.CheckpointHook(SaveConfig(name=name, every=1, keep_last=2, output_dir=output_dir))
    for step in range(1, saves + 1):
        trainer.state.step = step
        hook.on_step(trainer)
    print("done", flush=True)


def hold(path: str) -> None:
    tensors = {"lora_unet_x.lora_down.weight": torch.ones(4, 8), "lora_unet_x.lora_up.weight": torch.ones(8, 4),
               "lora_unet_x.alpha": torch.tensor(4.0)}

    def write_then_wait(temp: str) -> None:
        safetensors.torch.save_file(tensors, temp)
        print("writing", flush=True)
        sys.stdin.readline()

    export._write_atomically(Path(path), write_then_wait)
    print("done", flush=True)


if __name__ == "__main__":
    torch.set_num_threads(1)
    mode, *args = sys.argv[1:]
    if mode == "save-loop":
        save_loop(args[0], args[1], int(args[2]))
    else:
        hold(args[0])
