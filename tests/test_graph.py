"""The training graph in a live ComfyUI, driven over HTTP and the websocket as the frontend drives it.

Load Base Model (or, where ComfyUI's loaders cannot take a tiny model, the test-only Tiny Model Loader
of tests/graph_nodes) -> Dataset -> LoRA Config -> Train LoRA -> ComfyUI's own LoRA loader -> sampling
-> Save Image; cancelling and resuming a run; the cached base model after training; bad input; and the
example workflows as ComfyUI serves them. Models are tiny, images 64 px, runs a few steps.
"""

import json
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from graph_data import write_dataset, write_sd3_loader_files
from live_server import ComfyServer, ComfyServerError, EventStream
from PIL import Image
from workflows import TINY_RUN, nodes_of, problems, set_inputs, ui_to_api

REPO_ROOT = Path(__file__).resolve().parents[1]
EXAMPLES_DIR = REPO_ROOT / "example_workflows"
EXAMPLES = sorted(EXAMPLES_DIR.glob("*.json"))
# The tiny model each example runs on; SD3's goes through the example's own Load Base Model.
EXAMPLE_FAMILIES = {"train_sdxl_lora": "sdxl_eps", "train_sd35_lora": "sd3", "train_flux_lora": "flux_dev"}
# Tiny Model Loader families, and the tiny SD3 through the pack's Load Base Model and ComfyUI's file loaders.
SD3_LOAD_BASE_MODEL = "sd3_load_base_model"
FAMILIES = ("sdxl_eps", "sdxl_v", "sd3", "flux_dev", "flux_schnell", SD3_LOAD_BASE_MODEL)
PROMPT = "a red circle on a grey background"
STEPS = 4
TIMEOUT_S = 300


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def dataset(comfy_server: ComfyServer) -> str:
    """A dataset folder in the server's input folder, by the name the Dataset node takes."""
    write_dataset(comfy_server.input_dir / "graph_dataset")
    return "graph_dataset"


@pytest.fixture(scope="module")
def sd3_files(comfy_server: ComfyServer) -> dict[str, str]:
    """Tiny SD3 files in the server's model folders, by the Load Base Model input that takes them."""
    return write_sd3_loader_files(comfy_server.models_dir)


@pytest.fixture(scope="module")
def object_info(comfy_server: ComfyServer) -> dict:
    return comfy_server.get_json("/object_info")


def tiny_loader(family: str) -> dict:
    return {"class_type": "TestTinyModelLoader", "inputs": {"family": family}}


def base_model_loader(files: dict[str, str]) -> dict:
    """The pack's Load Base Model; `files` by input name, the others "(none)"."""
    inputs = dict.fromkeys(("checkpoint", "diffusion_model", "text_encoder_1", "text_encoder_2", "text_encoder_3",
                            "vae"), "(none)")
    return {"class_type": "LoraTrainer_LoadBaseModel", "inputs": inputs | {"weight_dtype": "default"} | files}


def loader_for(family: str, request: pytest.FixtureRequest) -> dict:
    if family == SD3_LOAD_BASE_MODEL:
        return base_model_loader(request.getfixturevalue("sd3_files"))
    return tiny_loader(family)


def training_graph(loader: dict, dataset: str, name: str, **train) -> dict:
    """Loader -> Dataset -> LoRA Config -> Train LoRA, API format; `train` overrides Train LoRA's inputs."""
    train_inputs = {
        "model": ["loader", 0], "clip": ["loader", 1], "vae": ["loader", 2], "dataset": ["dataset", 0],
        "lora_config": ["lora_config", 0], "output_name": name, "steps": STEPS, "learning_rate": 1e-2,
        "optimizer": "adamw", "schedule": "constant", "warmup_steps": 0, "batch_size": 1, "gradient_accumulation": 1,
        "precision": "fp32", "gradient_checkpointing": True, "seed": 0, "save_every": 2, "keep_last": 3,
        "save_dtype": "fp32", "sample_every": 2, "sample_prompts": PROMPT, "sample_seed": 1, "sample_size": 64,
        "resume_from": "", "compile_blocks": "auto", "save_format": "comfyui", "blocks_to_swap": -1,
    }
    dataset_inputs = {"folder": dataset, "resolution": 64, "trigger_word": "", "default_caption": "",
                      "caption_dropout": 0.0, "shuffle_tags": False, "keep_tags": 1, "flip": False}
    lora_inputs = {"rank": 4, "alpha": 4.0, "dropout": 0.0, "targets": "attention+mlp", "include": "", "exclude": ""}
    return {
        "loader": loader,
        "dataset": {"class_type": "LoraTrainer_Dataset", "inputs": dataset_inputs},
        "lora_config": {"class_type": "LoraTrainer_LoraConfig", "inputs": lora_inputs},
        "train": {"class_type": "LoraTrainer_TrainLoRA", "inputs": train_inputs | train},
    }


def preview(model: list, prefix: str, prompts: str = PROMPT) -> dict:
    """Sample Preview of the `model` link, with the loader's text encoders and VAE, into Save Image."""
    inputs = {"model": model, "clip": ["loader", 1], "vae": ["loader", 2], "prompts": prompts, "seed": 1, "width": 64,
              "height": 64, "steps": 4, "cfg": 1.0, "guidance": 0.0, "sampler": "default", "scheduler": "default",
              "negative": ""}
    return {
        "preview": {"class_type": "LoraTrainer_SamplePreview", "inputs": inputs},
        "save": {"class_type": "SaveImage", "inputs": {"images": ["preview", 0], "filename_prefix": prefix}},
    }


def through_lora_loader(training: dict, strength: float, prefix: str) -> dict:
    """The training graph, plus ComfyUI's LoRA loader taking the file Train LoRA names, then a preview."""
    lora_inputs = {"model": ["loader", 0], "lora_name": ["train", 1], "strength_model": strength}
    lora = {"lora": {"class_type": "LoraLoaderModelOnly", "inputs": lora_inputs}}
    return training | lora | preview(["lora", 0], prefix)


def run(events: EventStream, graph: dict) -> tuple[str, dict]:
    """Queues `graph` for `events`' client; waits until it ran, successfully, and its messages arrived.
    Returns the prompt id and its history entry."""
    prompt_id = events.post_prompt(graph)
    entry = events.server.wait_for(prompt_id, timeout=TIMEOUT_S)
    events.wait_until_done(prompt_id)
    return prompt_id, entry


def saved_image(server: ComfyServer, entry: dict) -> np.ndarray:
    (image,) = [image for output in entry["outputs"].values() for image in output.get("images", [])]
    return np.asarray(Image.open(server.output_dir / image["subfolder"] / image["filename"]))


def trainer_events(events: EventStream, kind: str) -> list[dict]:
    return [message["data"] for message in events.messages(f"lora_trainer.{kind}")]


def cached_nodes(entry: dict) -> set[str]:
    return {node for kind, data in entry["status"]["messages"] if kind == "execution_cached" for node in data["nodes"]}


def pack_folder(server: ComfyServer) -> str:
    """The pack's folder name in the host's custom_nodes, which names its templates."""
    (folder,) = [p.name for p in (server.host_dir / "custom_nodes").iterdir() if p.resolve() == REPO_ROOT]
    return folder


# -- the graph of every family ---------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_a_trained_lora_loads_in_comfyuis_lora_loader_and_changes_the_image(
    comfy_server: ComfyServer, dataset: str, request: pytest.FixtureRequest, family: str
) -> None:
    name = unique(f"graph-{family}")
    training = training_graph(loader_for(family, request), dataset, name)
    with comfy_server.events() as events:
        trained_id, trained = run(events, through_lora_loader(training, 1.0, name))
        # Only the LoRA loader and what follows run again: Train LoRA's result is cached.
        _, plain = run(events, through_lora_loader(training, 0.0, name))

    steps = trainer_events(events, "step")
    assert [s["step"] for s in steps] == list(range(1, STEPS + 1))
    assert all(s["total_steps"] == STEPS and np.isfinite(s["loss"]) for s in steps)
    assert len({s["run_id"] for s in steps}) == 1 and all(s["node"] == "train" for s in steps), "the panel's keys"
    assert [s["step"] for s in trainer_events(events, "sample")] == [2, STEPS]
    saved = trainer_events(events, "saved")
    assert [(s["kind"], s["step"]) for s in saved] == [("checkpoint", 2), ("lora", STEPS)]
    assert [(d["cancelled"], d["step"]) for d in trainer_events(events, "done")] == [(False, STEPS)]
    # The node's progress bar ends at the last step; sample previews arrive as binary messages.
    progress = [m["data"] for m in events.messages("progress", trained_id) if m["data"]["node"] == "train"]
    assert (progress[-1]["value"], progress[-1]["max"]) == (STEPS, STEPS)
    assert events.previews >= 2

    lora_name = saved[-1]["name"]
    assert lora_name == f"{name}/{name}.safetensors"
    assert (comfy_server.models_dir / "loras" / lora_name).is_file()
    listed = comfy_server.get_json("/object_info/LoraLoaderModelOnly")["LoraLoaderModelOnly"]["input"]["required"]
    assert lora_name in listed["lora_name"][0]
    assert (comfy_server.output_dir / name / "checkpoints" / "step-000002" / "resume.json").is_file()
    assert not np.array_equal(saved_image(comfy_server, trained), saved_image(comfy_server, plain))


# -- cancel and resume ---------------------------------------------------------------------------------


def test_cancel_saves_a_checkpoint_that_a_second_prompt_resumes_from(comfy_server: ComfyServer, dataset: str) -> None:
    name = unique("graph-cancel")
    long_run = training_graph(tiny_loader("flux_dev"), dataset, name, steps=100_000, save_every=0, sample_prompts="")
    with comfy_server.events() as events:
        prompt_id = events.post_prompt(long_run)
        events.wait_for(lambda m: m["type"] == "lora_trainer.step" and m["data"]["step"] >= 3, timeout=TIMEOUT_S)
        comfy_server.post_json("/interrupt", {})
        assert events.wait_until_done(prompt_id, timeout=TIMEOUT_S) == "execution_interrupted"

    entry = comfy_server.history_entry(prompt_id)
    assert entry["status"]["status_str"] == "error"
    assert "execution_interrupted" in [kind for kind, _ in entry["status"]["messages"]]
    last_step = trainer_events(events, "step")[-1]["step"]
    assert [(d["cancelled"], d["step"]) for d in trainer_events(events, "done")] == [(True, last_step)]
    (saved,) = trainer_events(events, "saved")
    checkpoint = comfy_server.output_dir / name / "checkpoints" / f"step-{last_step:06d}"
    assert (saved["kind"], Path(saved["path"])) == ("checkpoint", checkpoint)
    assert (checkpoint / "resume.json").is_file()
    assert not (comfy_server.models_dir / "loras" / name).exists()

    resumed = training_graph(tiny_loader("flux_dev"), dataset, name, steps=last_step + 2, save_every=0,
                             sample_prompts="", resume_from="latest")
    with comfy_server.events() as events:
        run(events, resumed)

    assert [s["step"] for s in trainer_events(events, "step")] == [last_step + 1, last_step + 2]
    assert trainer_events(events, "saved")[-1]["name"] == f"{name}/{name}.safetensors"

    # The same run without the interruption gives the same LoRA.
    straight_name = unique("graph-straight")
    straight = training_graph(tiny_loader("flux_dev"), dataset, straight_name, steps=last_step + 2, save_every=0,
                              sample_prompts="")
    with comfy_server.events() as events:
        run(events, straight)
    loras = comfy_server.models_dir / "loras"
    resumed_weights = safetensors.torch.load_file(loras / name / f"{name}.safetensors")
    straight_weights = safetensors.torch.load_file(loras / straight_name / f"{straight_name}.safetensors")
    assert resumed_weights.keys() == straight_weights.keys()
    assert all(torch.equal(resumed_weights[k], straight_weights[k]) for k in straight_weights)


# -- the cached base model ----------------------------------------------------------------------------


def test_training_leaves_the_cached_base_model_as_it_was(comfy_server: ComfyServer, dataset: str) -> None:
    name = unique("graph-untouched")
    loader = {"loader": tiny_loader("sdxl_eps")}
    before = comfy_server.wait_for(comfy_server.post_prompt(loader | preview(["loader", 0], f"{name}-before")))
    training = training_graph(tiny_loader("sdxl_eps"), dataset, name, sample_prompts="")
    with_lora = comfy_server.wait_for(
        comfy_server.post_prompt(training | preview(["train", 0], f"{name}-lora")), timeout=TIMEOUT_S
    )
    # Sample Preview skips blank lines: the same prompt, which ComfyUI cannot answer from its cache.
    after_graph = loader | preview(["loader", 0], f"{name}-after", PROMPT + "\n")
    after = comfy_server.wait_for(comfy_server.post_prompt(after_graph))

    assert "loader" in cached_nodes(with_lora) and "loader" in cached_nodes(after), "not the same model object"
    assert "preview" not in cached_nodes(after)
    image_before = saved_image(comfy_server, before)
    assert not np.array_equal(image_before, saved_image(comfy_server, with_lora))
    assert np.array_equal(image_before, saved_image(comfy_server, after))


# -- bad input ----------------------------------------------------------------------------------------


def test_a_missing_dataset_folder_fails_the_prompt_naming_the_folder(comfy_server: ComfyServer) -> None:
    folder = unique("no-such-dataset")
    graph = training_graph(tiny_loader("flux_dev"), folder, unique("graph-bad"), sample_prompts="")
    prompt_id = comfy_server.post_prompt(graph)

    with pytest.raises(ComfyServerError, match=rf"LoraTrainer_TrainLoRA.*{folder} is not a folder"):
        comfy_server.wait_for(prompt_id)


def test_load_base_model_without_a_model_is_refused_saying_what_to_choose(
    comfy_server: ComfyServer, dataset: str
) -> None:
    graph = training_graph(base_model_loader({}), dataset, unique("graph-bad"))

    with pytest.raises(ComfyServerError, match="400.*choose a checkpoint, or a diffusion model"):
        comfy_server.post_prompt(graph)


# -- the example workflows ------------------------------------------------------------------------------


def test_every_family_has_an_example_workflow_with_a_thumbnail() -> None:
    assert sorted(path.stem for path in EXAMPLES) == sorted(EXAMPLE_FAMILIES)
    for path in EXAMPLES:
        with Image.open(path.with_suffix(".jpg")) as thumbnail:
            assert thumbnail.format == "JPEG"


def test_the_server_offers_the_examples_as_templates_of_the_pack(comfy_server: ComfyServer) -> None:
    folder = pack_folder(comfy_server)
    assert sorted(comfy_server.get_json("/workflow_templates")[folder]) == sorted(EXAMPLE_FAMILIES)
    for path in EXAMPLES:
        base = f"/api/workflow_templates/{folder}/{path.stem}"
        assert comfy_server.get_json(f"{base}.json") == json.loads(path.read_text())
        with urllib.request.urlopen(f"{comfy_server.url}{base}.jpg", timeout=30) as response:
            assert response.read() == path.with_suffix(".jpg").read_bytes()


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda path: path.stem)
def test_an_example_workflow_fits_the_nodes_of_the_live_server(object_info: dict, path: Path) -> None:
    assert problems(json.loads(path.read_text()), object_info) == []


def test_the_workflow_check_reports_what_does_not_fit(object_info: dict) -> None:
    workflow = json.loads((EXAMPLES_DIR / "train_flux_lora.json").read_text())
    nodes = {node["type"]: node for node in workflow["nodes"]}
    nodes["LoraTrainer_TrainLoRA"]["widgets_values"].pop()
    nodes["KSampler"]["widgets_values"][4] = "no_such_sampler"
    workflow["links"][0][5] = "LATENT"

    found = problems(workflow, object_info)

    assert len(found) == 3, found
    assert "LoraTrainer_TrainLoRA" in found[0] and "no_such_sampler" in found[1] and "LATENT" in found[2]


def test_ui_to_api_gives_widget_values_to_their_inputs_and_links_to_their_origins(object_info: dict) -> None:
    workflow = json.loads((EXAMPLES_DIR / "train_flux_lora.json").read_text())
    graph = ui_to_api(workflow, object_info)

    (sampler,) = nodes_of(graph, "KSampler")
    # The seed's "control after generate" value ("fixed") belongs to no input.
    assert {k: v for k, v in sampler["inputs"].items() if not isinstance(v, list)} == {
        "seed": 42, "steps": 20, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0
    }
    (train,) = nodes_of(graph, "LoraTrainer_TrainLoRA")
    (lora,) = nodes_of(graph, "LoraLoader")
    train_id = next(node_id for node_id, node in graph.items() if node is train)
    assert lora["inputs"]["lora_name"] == [train_id, 1]
    assert (train["inputs"]["seed"], train["inputs"]["save_every"], train["inputs"]["resume_from"]) == (0, 250, "")


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda path: path.stem)
def test_an_example_workflow_runs_with_tiny_models(
    comfy_server: ComfyServer, object_info: dict, dataset: str, sd3_files: dict[str, str], path: Path
) -> None:
    graph = set_inputs(ui_to_api(json.loads(path.read_text()), object_info), TINY_RUN)
    family = EXAMPLE_FAMILIES[path.stem]
    (base_model,) = nodes_of(graph, "LoraTrainer_LoadBaseModel")
    if family == "sd3":
        base_model.update(base_model_loader(sd3_files))
    else:
        base_model.update(tiny_loader(family))
    name = unique(path.stem)
    set_inputs(graph, {"LoraTrainer_Dataset": {"folder": dataset}, "LoraTrainer_TrainLoRA": {"output_name": name}})

    entry = comfy_server.wait_for(comfy_server.post_prompt(graph), timeout=TIMEOUT_S)

    assert (comfy_server.models_dir / "loras" / name / f"{name}.safetensors").is_file()
    assert saved_image(comfy_server, entry).shape == (64, 64, 3)
    # The Flux and SDXL examples hold a tenth of the subject's images out (here one image of four) for the
    # validation loss, evaluated every 100 steps: in these 4 steps, at the end only.
    holds_out = any(node["inputs"]["validation_split"] > 0 for node in nodes_of(graph, "LoraTrainer_Dataset"))
    assert holds_out == (path.stem in ("train_flux_lora", "train_sdxl_lora"))
    run = comfy_server.get_json("/lora_trainer/status")["run"]
    steps = TINY_RUN["LoraTrainer_TrainLoRA"]["steps"]
    assert run["name"] == name and run["history"]["validation"]["step"] == ([steps] if holds_out else [])


# -- several datasets ------------------------------------------------------------------------------------


def test_chained_dataset_nodes_train_one_lora_on_both_with_masks_and_preservation(
    comfy_server: ComfyServer, dataset: str
) -> None:
    """A regularisation Dataset chained into the subject's, whose masks sit in the input folder; preservation on."""
    masks = comfy_server.input_dir / "graph_dataset_masks"
    masks.mkdir(exist_ok=True)
    for image in sorted((comfy_server.input_dir / dataset).glob("*.png")):
        mask = Image.new("L", (64, 64), 0)
        mask.paste(255, (16, 16, 48, 48))  # the shape trains, the grey background does not
        mask.save(masks / image.name)
    write_dataset(comfy_server.input_dir / "graph_class_images", count=2)
    name = unique("graph-datasets")
    graph = training_graph(tiny_loader("sdxl_eps"), dataset, name, sample_prompts="")
    graph["dataset"]["inputs"] |= {"trigger_word": "shp", "mask_folder": "graph_dataset_masks", "repeats": 2,
                                   "preservation_class": "shape", "preservation_weight": 0.5,
                                   "dataset": ["class_images", 0]}
    class_inputs = graph["dataset"]["inputs"] | {"folder": "graph_class_images", "trigger_word": "",
                                                 "regularization": True, "loss_weight": 0.5}
    for key in ("dataset", "mask_folder", "preservation_class", "preservation_weight", "repeats"):
        del class_inputs[key]
    graph["class_images"] = {"class_type": "LoraTrainer_Dataset", "inputs": class_inputs}
    with comfy_server.events() as events:
        run(events, graph)

    steps = trainer_events(events, "step")
    assert [s["step"] for s in steps] == list(range(1, STEPS + 1)) and all(np.isfinite(s["loss"]) for s in steps)
    lora = comfy_server.models_dir / "loras" / name / f"{name}.safetensors"
    with safetensors.safe_open(str(lora), framework="pt") as file:
        metadata = file.metadata()
    # The subject's 4 images, 2 repeats each, carry the trigger word; the class images are not counted.
    assert metadata["modelspec.trigger_phrase"] == "shp" and metadata["ss_num_train_images"] == "8"
    assert list(json.loads(metadata["ss_tag_frequency"])) == [dataset]


def test_a_regularisation_dataset_with_a_trigger_word_fails_the_prompt_saying_so(comfy_server: ComfyServer,
                                                                                 dataset: str) -> None:
    graph = training_graph(tiny_loader("sd3"), dataset, unique("graph-bad-reg"), sample_prompts="")
    graph["dataset"]["inputs"] |= {"trigger_word": "shp", "regularization": True}
    with pytest.raises(ComfyServerError, match=r"dataset\.trigger_word: a regularisation dataset trains its class "
                                               r"without the trigger word"):
        comfy_server.wait_for(comfy_server.post_prompt(graph))
