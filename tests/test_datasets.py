"""Several datasets, masked loss, regularisation weight and differential output preservation (DOP), on the
tiny models: each against a formula computed here, independently of the engine's code path."""

import importlib
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_server import PACK_MODULE, import_pack
from tiny_encoders import build_clip, build_vae
from tiny_models import MODEL_FACTORIES, random_inputs

from trainer_core import export
from trainer_core.config import ConfigError, LoraConfig, SaveConfig, TrainConfig
from trainer_core.data import DatasetConfig, DatasetError, Datasets, build_samples, preservation_caption
from trainer_core.job import JobHook, TrainingJob
from trainer_core.objective import LOSS_MASK, LOSS_WEIGHT, PRESERVE, PRESERVE_WEIGHT
from trainer_core.trainer import BatchOrder, Sample, Trainer

LATENT_HW = (8, 8)
FAMILIES = ["sdxl_eps", "sd3", "flux_dev"]
TRIGGER = "sks"


def noise_image(size: tuple[int, int], seed: int, mode: str = "RGB") -> Image.Image:
    channels = len(mode)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    return Image.fromarray(pixels, mode)


def write_images(folder: Path, captions: dict[str, str], size=(64, 64), seed=0) -> Path:
    """One random image per name (its relative path), each with its caption beside it."""
    for index, (name, caption) in enumerate(captions.items()):
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        noise_image(size, seed + index).save(path)
        path.with_suffix(".txt").write_text(caption)
    return folder


def sd3_encoders():
    return MODEL_FACTORIES["sd3"](), build_clip("sd3"), build_vae(16)


def train_config(**overrides) -> TrainConfig:
    values = dict(steps=4, learning_rate=1e-2, precision="fp32", gradient_checkpointing=False, weight_decay=0.0,
                  seed=3, optimizer="adamw")
    return TrainConfig(**(values | overrides))


def dataset_of(sample: Sample) -> str:
    return sample.key.partition(": ")[0] if sample.key.startswith("dataset ") else "dataset 1"


# -- several datasets -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_datasets(tmp_path_factory):
    """A subject dataset (2 images at 64 px, one of them in a 2_ folder, repeats 3) and a style dataset
    (3 images at 128 px whose captions are longer than one CLIP chunk), encoded for the tiny SD3."""
    root = tmp_path_factory.mktemp("two")
    subject = write_images(root / "subject", {"cat.png": "a cat", "2_more/dog.png": "sks, a dog"})
    long_caption = ", ".join(f"tag{i}" for i in range(60))
    style = write_images(root / "style", {f"s{i}.png": f"style {i}, {long_caption}" for i in range(3)},
                         size=(128, 128), seed=10)
    datasets = Datasets((
        DatasetConfig(folder=str(subject), resolution=64, trigger_word=TRIGGER, repeats=3),
        DatasetConfig(folder=str(style), resolution=128, caption_dropout=0.1),
    ))
    patcher, clip, vae = sd3_encoders()
    samples, report = build_samples(datasets, patcher, clip, vae, root, root / "out")
    return patcher, samples, report


def test_each_dataset_has_its_repeats_buckets_and_captions(two_datasets):
    _, samples, report = two_datasets
    counts = {}
    for sample in samples:
        counts[dataset_of(sample)] = counts.get(dataset_of(sample), 0) + 1
    # cat: 1 x 3 repeats; dog: 2 (its folder) x 3; style: 3 images x 1.
    assert counts == {"dataset 1": 9, "dataset 2": 3}
    assert report.samples == 12 and report.images == 5 and report.train_images == 12
    assert report.buckets == {(64, 64): 9, (128, 128): 3}
    assert {tuple(s.latents.shape) for s in samples if dataset_of(s) == "dataset 2"} == {(16, 16, 16)}
    # Every caption of both datasets has one token length, whatever its dataset: any two samples of a
    # bucket stack into one batch.
    shapes = {tuple(c["context"].shape) for s in samples for c in (s.conditioning, *(a for _, a in s.alternatives))}
    assert len(shapes) == 1
    assert report.captions["cat.png"] == [(1.0, "sks, a cat")]
    assert report.captions["dataset 2: s0.png"][-1] == (pytest.approx(0.1), "")  # its own caption dropout


def test_the_sampling_proportions_follow_the_repeats(two_datasets):
    patcher, samples, _ = two_datasets
    trainer = Trainer(patcher, samples, LoraConfig(rank=2), train_config(batch_size=2, seed=11))
    for epoch in range(20):
        shares = {}
        for batch in trainer.order.epoch(epoch):
            # A batch comes from one bucket: its latents, and so its dataset's resolution, are one shape.
            assert len({tuple(samples[i].latents.shape) for i in batch}) == 1
            for index in batch:
                shares[dataset_of(samples[index])] = shares.get(dataset_of(samples[index]), 0) + 1
        # Each epoch shows every sample once: exactly the images times their repeats of each dataset.
        assert shares == {"dataset 1": 9, "dataset 2": 3}
    # Within an epoch the order is random, not one dataset after the other: over the first third of each of
    # many epochs (at batch size 1, the order of the samples itself), the subject's share is still 9/12,
    # within 5 standard deviations of a binomial count.
    order = BatchOrder([tuple(s.latents.shape) for s in samples], batch_size=1, seed=11)
    firsts = [dataset_of(samples[batch[0]]) for epoch in range(300) for batch in order.epoch(epoch)[:4]]
    expected, sigma = len(firsts) * 0.75, math.sqrt(len(firsts) * 0.75 * 0.25)
    assert abs(firsts.count("dataset 1") - expected) < 5 * sigma
    assert 0 < firsts.count("dataset 2")


def test_the_datasets_of_a_run_share_one_cache_folder_entry_per_image(two_datasets, tmp_path):
    patcher, _, first = two_datasets
    subject, style = first.folder, first.folder.parent / "style"
    # The style dataset alone, later, reads its latents from the cache the two datasets filled.
    _, clip, vae = sd3_encoders()
    _, report = build_samples(DatasetConfig(folder=str(style), resolution=128), patcher, clip, vae, tmp_path,
                              subject.parent / "out")
    assert (report.latents_cached, report.latents_encoded) == (3, 0)


# -- masks --------------------------------------------------------------------------------------


def block_means(mask: np.ndarray, cell: int) -> np.ndarray:
    """The mean of each cell x cell block of a (H, W) array."""
    height, width = mask.shape
    return mask.reshape(height // cell, cell, width // cell, cell).mean(axis=(1, 3))


@pytest.fixture(scope="module")
def masked_dataset(tmp_path_factory):
    """Two 64 px images; masks in a folder (one grey ramp, one left half black) and an alpha channel on one."""
    root = tmp_path_factory.mktemp("masked")
    folder = write_images(root / "images", {"a.png": "sks, a", "b.png": "sks, b"})
    rgba = noise_image((64, 64), 5, "RGBA")
    alpha = np.zeros((64, 64), np.uint8)
    alpha[16:48, 8:40] = 255
    rgba.putalpha(Image.fromarray(alpha))
    rgba.save(folder / "b.png")
    masks = root / "masks"
    masks.mkdir()
    ramp = np.tile(np.linspace(0, 255, 64).round().astype(np.uint8), (64, 1))
    ramp[:, :20] = 0
    Image.fromarray(ramp).save(masks / "a.png")
    half = np.full((64, 64), 255, np.uint8)
    half[:, :32] = 0
    Image.fromarray(half).convert("RGB").save(masks / "b.png")  # an RGB mask is read as its grey values
    return root, {"a.png": ramp, "b.png": half}, alpha


@pytest.mark.parametrize("alpha_mask, use_folder", [(False, True), (True, False), (True, True)])
def test_a_mask_becomes_the_mean_of_its_pixels_over_each_latent_cell(masked_dataset, alpha_mask, use_folder):
    root, files, alpha = masked_dataset
    config = DatasetConfig(folder=str(root / "images"), resolution=64, flip=True, alpha_mask=alpha_mask,
                           mask_folder=str(root / "masks") if use_folder else "")
    patcher, clip, vae = sd3_encoders()
    samples, report = build_samples(config, patcher, clip, vae, root, root / "out")
    for sample in samples:
        name, flipped = sample.key.removesuffix(" (flipped)"), sample.key.endswith("(flipped)")
        pixels = np.ones((64, 64))
        if use_folder:
            pixels = pixels * files[name] / 255.0
        if alpha_mask and name == "b.png":
            pixels = pixels * alpha / 255.0
        if flipped:
            pixels = pixels[:, ::-1]
        expected = torch.from_numpy(block_means(pixels, 8)).float()[None]
        for conditioning in (sample.conditioning, *(c for _, c in sample.alternatives)):
            mask = conditioning[LOSS_MASK]
            assert mask.shape == (1, 8, 8)
            torch.testing.assert_close(mask, expected, rtol=0, atol=1e-6)
            # A cell all of whose pixels are black weighs exactly 0.
            assert torch.equal(mask == 0, expected == 0)
    masked_samples = 4 if use_folder else 2  # without the folder, only b.png has a mask (its alpha), flipped too
    assert report.masked == masked_samples


def test_mask_mistakes_are_refused_saying_what_to_fix(masked_dataset, tmp_path):
    root, _, _ = masked_dataset
    patcher, clip, vae = sd3_encoders()

    def build_with(masks: Path):
        config = DatasetConfig(folder=str(root / "images"), resolution=64, mask_folder=str(masks))
        return build_samples(config, patcher, clip, vae, root, tmp_path)

    missing = tmp_path / "missing"
    missing.mkdir()
    Image.new("L", (64, 64), 255).save(missing / "a.png")
    with pytest.raises(DatasetError, match=r"b\.png has no mask: add .*missing/b\.png"):
        build_with(missing)
    small = tmp_path / "small"
    small.mkdir()
    for name in ("a", "b"):
        Image.new("L", (32, 32), 255).save(small / f"{name}.png")
    with pytest.raises(DatasetError, match=r"the mask is 32x32, its image .* is 64x64"):
        build_with(small)
    black = tmp_path / "black"
    black.mkdir()
    Image.new("L", (64, 64), 255).save(black / "a.png")
    Image.new("L", (64, 64), 0).save(black / "b.png")
    with pytest.raises(DatasetError, match=r"b\.png: its mask is black everywhere"):
        build_with(black)
    with pytest.raises(ConfigError, match=r"dataset\.mask_folder: .*nowhere is not a folder"):
        build_with(tmp_path / "nowhere")


# -- the loss terms, on every family --------------------------------------------------------------


def fixed_batch(patcher, count: int, seed: int = 0):
    """`count` samples' latents and conditioning stacked, with fixed noise and timesteps."""
    inputs = random_inputs(patcher, batch=count, latent_hw=LATENT_HW, seed=seed)
    latents = inputs["x"]
    conditioning = {"context": inputs["context"], "y": inputs["y"]}
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(seed + 1))
    is_sdxl = type(patcher.model).__name__ == "SDXL"
    timesteps = torch.tensor([300, 700, 500][:count]) if is_sdxl else torch.tensor([0.3, 0.7, 0.5][:count])
    return latents, conditioning, noise, timesteps


def trainer_for(patcher, latents, conditioning) -> Trainer:
    samples = [Sample(latents[i], {k: v[i] for k, v in conditioning.items()}, str(i)) for i in range(len(latents))]
    trainer = Trainer(patcher, samples, LoraConfig(rank=4, alpha=4.0), train_config())
    # B away from zero, so that the LoRA changes the model's output.
    with torch.no_grad():
        for _, layer in trainer.network.items():
            layer.up.normal_(0, 0.2, generator=torch.Generator().manual_seed(1))
    return trainer


def recording_predictions(trainer: Trainer) -> list[torch.Tensor]:
    """Every prediction the trainer's family makes from now on, kept with its gradient."""
    made = []
    predict = trainer.family.predict

    def recorded(*args, **kwargs):
        prediction = predict(*args, **kwargs)
        if prediction.requires_grad:
            prediction.retain_grad()
        made.append(prediction)
        return prediction

    trainer.family.predict = recorded
    return made


@pytest.mark.parametrize("name", FAMILIES)
def test_outside_the_mask_the_gradient_is_exactly_zero(name):
    patcher = MODEL_FACTORIES[name]()
    latents, conditioning, noise, timesteps = fixed_batch(patcher, 2)
    mask = torch.rand((2, 1, *LATENT_HW), generator=torch.Generator().manual_seed(2))
    mask[:, :, :, :3] = 0
    mask[1] = 0  # the second sample is left out whole
    trainer = trainer_for(patcher, latents, conditioning)
    predictions = recording_predictions(trainer)
    with trainer.session():
        loss = trainer.loss(latents, conditioning | {LOSS_MASK: mask}, noise, timesteps)
        loss.backward()
    (prediction,) = predictions
    _, target = trainer.family.noisy_input_and_target(latents, noise, timesteps)
    error = prediction.detach().float() - target.float()
    # mean over every element of the mask-weighted squared error; its gradient 2·m·error / count.
    weight = trainer.family.loss_weight(timesteps)
    per_sample = (mask * error.square()).flatten(1).mean(1) * (1 if weight is None else weight)
    torch.testing.assert_close(loss, per_sample.mean())
    assert torch.count_nonzero(prediction.grad[:, :, :, :3]) == 0
    assert torch.count_nonzero(prediction.grad[1]) == 0
    if weight is None:
        torch.testing.assert_close(prediction.grad, 2 * mask * error / error.numel())
    assert torch.count_nonzero(prediction.grad[0, :, :, 3:]) > 0


@pytest.mark.parametrize("name", FAMILIES)
def test_a_sample_masked_out_whole_gives_every_lora_weight_a_zero_gradient(name):
    patcher = MODEL_FACTORIES[name]()
    latents, conditioning, noise, timesteps = fixed_batch(patcher, 1)
    trainer = trainer_for(patcher, latents, conditioning)
    with trainer.session():
        trainer.loss(latents, conditioning | {LOSS_MASK: torch.zeros((1, 1, *LATENT_HW))}, noise, timesteps).backward()
    gradients = [p.grad for p in trainer.network.parameters()]
    assert all(g is None or torch.count_nonzero(g) == 0 for g in gradients)


@pytest.mark.parametrize("name", FAMILIES)
def test_the_loss_weight_multiplies_each_samples_loss(name):
    patcher = MODEL_FACTORIES[name]()
    latents, conditioning, noise, timesteps = fixed_batch(patcher, 2)
    trainer = trainer_for(patcher, latents, conditioning)
    with trainer.session(), torch.no_grad():
        alone = [trainer.loss(latents[i:i + 1], {k: v[i:i + 1] for k, v in conditioning.items()}, noise[i:i + 1],
                              timesteps[i:i + 1]) for i in range(2)]
        weighted = trainer.loss(latents, conditioning | {LOSS_WEIGHT: torch.tensor([1.0, 0.25])}, noise, timesteps)
    torch.testing.assert_close(weighted, (alone[0] + 0.25 * alone[1]) / 2)


@pytest.mark.parametrize("name", FAMILIES)
def test_a_disabled_network_computes_the_base_model_exactly(name):
    patcher = MODEL_FACTORIES[name]()
    latents, conditioning, noise, timesteps = fixed_batch(patcher, 1)
    trainer = trainer_for(patcher, latents, conditioning)
    family = trainer.family
    noisy, _ = family.noisy_input_and_target(latents, noise, timesteps)
    with torch.no_grad():
        base = family.predict(noisy, timesteps, conditioning)
        with trainer.network.attached(family.diffusion_model):
            with trainer.network.disabled():
                disabled = family.predict(noisy, timesteps, conditioning)
            enabled = family.predict(noisy, timesteps, conditioning)
    assert torch.equal(disabled, base)
    assert not torch.allclose(enabled, base)
    assert trainer.network.enabled


@pytest.mark.parametrize("name", FAMILIES)
def test_dop_pulls_the_loras_class_prediction_to_the_base_models(name):
    patcher = MODEL_FACTORIES[name]()
    latents, conditioning, noise, timesteps = fixed_batch(patcher, 2)
    class_conditioning = fixed_batch(patcher, 2, seed=7)[1]
    trainer = trainer_for(patcher, latents, conditioning)
    family = trainer.family
    noisy, _ = family.noisy_input_and_target(latents, noise, timesteps)
    with torch.no_grad():
        # The base model without any LoRA hooked on: the target, computed without the network's switch.
        base = family.predict(noisy, timesteps, class_conditioning)
    weights = torch.tensor([1.5, 0.0])  # the second caption lacks the trigger word
    terms = {PRESERVE + k: v for k, v in class_conditioning.items()} | {PRESERVE_WEIGHT: weights}
    with trainer.session():
        plain = trainer.loss(latents, conditioning, noise, timesteps)
        plain.backward()
        plain_gradients = [p.grad.clone() for p in trainer.network.parameters()]
        trainer.network.zero_grad()
        predictions = recording_predictions(trainer)
        with_dop = trainer.loss(latents, conditioning | terms, noise, timesteps)
        with_dop.backward()
    lora_on_class = predictions[-1]
    distance = (lora_on_class.detach() - base).square().flatten(1).mean(1)
    torch.testing.assert_close(with_dop, plain + (distance * weights).mean())
    # The preservation gradient flows through the LoRA's prediction only, 2·w·(pred − base) / count per
    # sample: none for the sample of weight 0, none into the base prediction.
    expected = 2 * weights.view(-1, 1, 1, 1) * (lora_on_class.detach() - base) / lora_on_class[0].numel() / 2
    torch.testing.assert_close(lora_on_class.grad, expected)
    assert not predictions[1].requires_grad  # the LoRA-off forward kept no graph
    dop_gradients = [p.grad - g for p, g in zip(trainer.network.parameters(), plain_gradients, strict=True)]
    assert any(torch.count_nonzero(g) > 0 for g in dop_gradients)


# -- regularisation and DOP from the data ---------------------------------------------------------


@pytest.fixture(scope="module")
def subject_and_class(tmp_path_factory):
    root = tmp_path_factory.mktemp("reg")
    subject = write_images(root / "subject", {"me.png": "a man, smiling", "me2.png": "sks man at the beach"})
    people = write_images(root / "people", {"p1.png": "a man, smiling", "p2.png": "a woman, sks"}, seed=20)
    return root, subject, people


def test_preservation_caption_replaces_the_whole_trigger_word():
    assert preservation_caption("sks, a man, SKS sksx", TRIGGER, "person") == "person, a man, person sksx"
    assert preservation_caption("a man", TRIGGER, "person") is None


def test_a_regularisation_dataset_and_dop_build_their_terms_into_every_caption(subject_and_class):
    root, subject, people = subject_and_class
    datasets = Datasets((
        DatasetConfig(folder=str(subject), resolution=64, trigger_word=TRIGGER, caption_dropout=0.2,
                      preservation_class="man", preservation_weight=0.5),
        DatasetConfig(folder=str(people), resolution=64, regularization=True, loss_weight=0.3),
    ))
    assert datasets.trigger_word == TRIGGER
    patcher, clip, vae = sd3_encoders()
    tokenized = []
    tokenize = clip.tokenize
    clip.tokenize = lambda text: tokenized.append(text) or tokenize(text)
    samples, report = build_samples(datasets, patcher, clip, vae, root, root / "out")
    # The trigger goes in front of the subject's captions, never the class's (the reg images keep theirs as written).
    assert report.captions["me.png"][0] == (pytest.approx(0.8), "sks, a man, smiling")
    assert report.captions["dataset 2: p1.png"] == [(1.0, "a man, smiling")]
    assert report.captions["dataset 2: p2.png"] == [(1.0, "a woman, sks")]
    assert report.preserved == {"sks, a man, smiling": "man, a man, smiling",
                                "sks man at the beach": "man man at the beach"}
    assert {"man, a man, smiling", "man man at the beach"} <= set(tokenized)
    # kohya's counts are of the trained images: the regularisation images are not among them.
    assert report.train_images == 2 and set(report.tag_frequency) == {"subject"}
    by_key = {s.key: s for s in samples}
    encoded = {}
    for sample in samples:
        for text_probability, conditioning in zip(report.captions[sample.key],
                                                  (sample.conditioning, *(c for _, c in sample.alternatives)),
                                                  strict=True):
            encoded[text_probability[1]] = conditioning
    subject_caption = encoded["sks, a man, smiling"]
    assert float(subject_caption[LOSS_WEIGHT]) == 1.0 and float(subject_caption[PRESERVE_WEIGHT]) == 0.5
    assert not torch.equal(subject_caption[PRESERVE + "context"], subject_caption["context"])
    dropped = encoded[""]
    assert float(dropped[PRESERVE_WEIGHT]) == 0.0  # no trigger, no preservation
    reg = by_key["dataset 2: p2.png"].conditioning
    assert float(reg[LOSS_WEIGHT]) == pytest.approx(0.3) and float(reg[PRESERVE_WEIGHT]) == 0.0
    assert all(LOSS_MASK not in c for c in encoded.values())  # no dataset has masks


def test_the_class_word_conditioning_is_the_encoding_of_the_class_caption(subject_and_class):
    root, subject, _ = subject_and_class
    patcher, clip, vae = sd3_encoders()
    preserving = DatasetConfig(folder=str(subject), resolution=64, trigger_word=TRIGGER, preservation_class="man")
    samples, report = build_samples(preserving, patcher, clip, vae, root, root / "out1")
    me = next(s for s in samples if s.key == "me.png")
    # The same captions written out with the class word, in a dataset of their own: one token length.
    direct = root / "direct"
    write_images(direct, {"me.png": "man, a man, smiling", "me2.png": "man man at the beach"})
    plain, _ = build_samples(DatasetConfig(folder=str(direct), resolution=64), patcher, clip, vae, root, root / "o2")
    reference = next(s for s in plain if s.key == "me.png").conditioning
    assert torch.equal(me.conditioning[PRESERVE + "context"], reference["context"])
    assert torch.equal(me.conditioning[PRESERVE + "y"], reference["y"])


@pytest.mark.parametrize("overrides, field", [
    ({"regularization": True, "trigger_word": "sks"}, "trigger_word"),
    ({"preservation_class": "man"}, "preservation_class"),
    ({"regularization": True, "preservation_class": "man"}, "preservation_class"),
    ({"loss_weight": 0.0}, "loss_weight"),
    ({"preservation_weight": float("nan")}, "preservation_weight"),
    ({"repeats": 0}, "repeats"),
])
def test_wrong_dataset_settings_name_their_field(overrides, field):
    with pytest.raises(ConfigError, match=rf"^dataset\.{field}: "):
        DatasetConfig(**({"folder": "x"} | overrides))


# -- resume ---------------------------------------------------------------------------------------


class CancelAt(JobHook):
    def __init__(self, step: int):
        self.every = step
        self.job = None

    def on_step(self, trainer):
        self.job.cancel()
        return []


def test_resume_is_bit_exact_with_two_datasets_a_mask_regularisation_and_dop(masked_dataset, subject_and_class,
                                                                             tmp_path):
    mask_root, _, _ = masked_dataset
    root, _, people = subject_and_class
    datasets = Datasets((
        DatasetConfig(folder=str(mask_root / "images"), resolution=64, trigger_word=TRIGGER, alpha_mask=True,
                      mask_folder=str(mask_root / "masks"), caption_dropout=0.3, preservation_class="man",
                      flip=True),
        DatasetConfig(folder=str(people), resolution=64, regularization=True, loss_weight=0.5),
    ))
    patcher, clip, vae = sd3_encoders()
    samples, _ = build_samples(datasets, patcher, clip, vae, root, tmp_path / "cache")
    lora, config = LoraConfig(rank=4, alpha=4.0), train_config(steps=5, batch_size=2)

    straight = Trainer(patcher, samples, lora, config)
    losses = []
    straight.run(lambda t, reports: losses.extend(r.loss for r in reports))
    assert all(math.isfinite(loss) for loss in losses)

    save = SaveConfig(name="resume-terms", every=2, output_dir=str(tmp_path))
    first = Trainer(patcher, samples, lora, config)
    cancel = CancelAt(2)
    job = cancel.job = TrainingJob(first, [export.CheckpointHook(save), cancel])
    with job:
        list(job.events())
    job.result()
    second = Trainer(patcher, samples, lora, config)
    export.resume(second, export.checkpoints_folder(save))
    assert second.state.step == 2
    second.run()
    expected, actual = straight.network.state_dict(), second.network.state_dict()
    assert all(torch.equal(actual[k], expected[k]) for k in expected)


# -- compiled blocks, and the node ---------------------------------------------------------------------


def samples_with_every_term(patcher, count: int = 2) -> list[Sample]:
    """Samples whose conditionings carry a mask, a loss weight and a class-word conditioning."""
    latents, conditioning, _, _ = fixed_batch(patcher, count)
    class_conditioning = fixed_batch(patcher, count, seed=7)[1]
    samples = []
    for i in range(count):
        mask = torch.ones((1, *LATENT_HW))
        mask[:, :, : 2 + i] = 0
        terms = {LOSS_MASK: mask, LOSS_WEIGHT: torch.tensor(0.5 + i), PRESERVE_WEIGHT: torch.tensor(1.0 - i / 2)}
        own = {k: v[i] for k, v in conditioning.items()}
        preserve = {PRESERVE + k: v[i] for k, v in class_conditioning.items()}
        samples.append(Sample(latents[i], own | preserve | terms, str(i)))
    return samples


@pytest.mark.parametrize("name", ["sd3"])  # compiling takes minutes on the CPU: one family
def test_compiled_checkpointed_blocks_train_with_every_term_like_eager_ones(name):
    """The LoRA-off pass of DOP runs without gradient, where compiled blocks run eagerly; the two passes with
    the LoRA on run compiled and checkpointed. The losses are the eager run's."""
    patcher = MODEL_FACTORIES[name]()
    losses = []
    for mode in ("off", "on"):
        trainer = Trainer(patcher, samples_with_every_term(patcher), LoraConfig(rank=4),
                          train_config(steps=3, gradient_checkpointing=True, compile_blocks=mode, batch_size=2))
        reported = []
        trainer.run(lambda t, reports, reported=reported: reported.extend(r.loss for r in reports))
        losses.append(torch.tensor(reported))
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-4, atol=1e-5)


def test_chained_dataset_nodes_give_the_datasets_in_chain_order():
    import_pack()  # the node modules import the engine relative to the pack, as ComfyUI loads them
    node_module = importlib.import_module(f"{PACK_MODULE}.nodes.dataset")
    DatasetNode, DatasetConfig = node_module.DatasetNode, node_module.DatasetConfig  # noqa: N806

    first = DatasetNode.execute("people", 512, "", "", 0.0, False, 1, False, regularization=True).result[0]
    second = DatasetNode.execute(" me ", 1024, " sks ", "", 0.05, False, 1, True, dataset=first, repeats=3,
                                 mask_folder=" masks ", preservation_class=" person ").result[0]
    assert [c.folder for c in second.members] == ["people", " me "]
    assert second.members[0].regularization and second.members[0].loss_weight == 1.0
    me = second.members[1]
    assert (me.trigger_word, me.repeats, me.mask_folder, me.preservation_class) == ("sks", 3, "masks", "person")
    assert second.trigger_word == "sks"
    # A graph saved before these inputs existed gives none of them: the defaults stand in.
    alone = DatasetNode.execute("me", 1024, "", "", 0.05, False, 1, False).result[0]
    assert alone.members == (DatasetConfig(folder="me", resolution=1024, caption_dropout=0.05, keep_tags=1),)
