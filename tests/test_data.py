"""The dataset: folder scanning, buckets, captions, cached latents and embeddings, on the tiny models."""

import shutil

import comfy.model_management as model_management
import numpy as np
import pytest
import torch
from PIL import ExifTags, Image
from tiny_encoders import LATENT_CHANNELS, build_clip, build_vae, text_encoder_dims
from tiny_models import MODEL_FACTORIES

from trainer_core.config import ConfigError, LoraConfig, TrainConfig
from trainer_core.data import (
    DatasetConfig,
    DatasetError,
    bucket_sizes,
    build_samples,
    caption_variants,
    equal_length_tokens,
    load_pixels,
    model_fingerprint,
    nearest_bucket,
    resolve_folder,
    scan,
)
from trainer_core.trainer import Trainer

# Image files of the test dataset: name -> ((width, height), caption or None).
IMAGES = {
    "red.png": ((64, 64), "red, square, plain"),
    "wide.jpg": ((128, 64), "a wide photo, sky, sks"),
    "tall.webp": ((64, 96), None),
    "3_person/face.png": ((64, 64), "person, smiling, outdoors, daylight"),
}
DEFAULT_CAPTION = "an image"
TRIGGER = "sks"


def noise_image(size: tuple[int, int], seed: int) -> Image.Image:
    """Random pixels: no symmetry, so a mirrored image encodes differently."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def write_dataset(root) -> None:
    for index, (name, (size, caption)) in enumerate(IMAGES.items()):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        noise_image(size, index).save(path)
        if caption is not None:
            path.with_suffix(".txt").write_text(caption)
    (root / "notes").mkdir()  # not N_name: skipped
    (root / "notes" / "ignored.png").write_bytes((root / "red.png").read_bytes())
    (root / "readme.md").write_text("not an image")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("dataset")
    write_dataset(root)
    return root


class CountingVAE:
    """A comfy.sd.VAE that counts its encode calls."""

    def __init__(self, vae):
        self.vae = vae
        self.encoded = 0

    def __getattr__(self, name):
        return getattr(self.vae, name)

    def encode(self, pixels):
        self.encoded += 1
        return self.vae.encode(pixels)


class CountingCLIP:
    """A comfy.sd.CLIP that records the texts it tokenizes and counts its encode calls."""

    def __init__(self, clip):
        self.clip = clip
        self.tokenized: set[str] = set()
        self.encoded = 0

    def __getattr__(self, name):
        return getattr(self.clip, name)

    def tokenize(self, text):
        self.tokenized.add(text)
        return self.clip.tokenize(text)

    def encode_from_tokens(self, tokens, return_pooled=False):
        self.encoded += 1
        return self.clip.encode_from_tokens(tokens, return_pooled=return_pooled)


MODELS = {"sdxl": ("sdxl_eps", 4), "sd3": ("sd3", 16), "flux": ("flux_dev", 16)}


def encoders(family: str) -> tuple[object, CountingCLIP, CountingVAE]:
    model, channels = MODELS[family]
    return MODEL_FACTORIES[model](), CountingCLIP(build_clip(family)), CountingVAE(build_vae(channels))


def config(folder, **overrides) -> DatasetConfig:
    values = dict(folder=str(folder), resolution=64, default_caption=DEFAULT_CAPTION, trigger_word=TRIGGER)
    return DatasetConfig(**(values | overrides))


def build(cfg: DatasetConfig, family: str, cache_dir):
    patcher, clip, vae = encoders(family)
    samples, report = build_samples(cfg, patcher, clip, vae, input_dir=cache_dir, output_dir=cache_dir)
    return samples, report, clip, vae


# Flip, shuffled tags and caption dropout at once; resolution 64 puts every image in one 64x64 bucket.
FULL = dict(flip=True, shuffle_tags=True, keep_tags=1, shuffle_variants=3, caption_dropout=0.2)


@pytest.fixture(scope="module")
def sdxl_build(dataset, tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    return (*build(config(dataset, **FULL), "sdxl", cache), cache)


# -- configuration and scanning ------------------------------------------------------------------


@pytest.mark.parametrize("overrides, field", [
    ({"folder": " "}, "folder"),
    ({"resolution": 100}, "resolution"),
    ({"resolution": 0}, "resolution"),
    ({"caption_dropout": 1.0}, "caption_dropout"),
    ({"keep_tags": -1}, "keep_tags"),
    ({"shuffle_variants": 0}, "shuffle_variants"),
    ({"min_bucket_side": 96}, "min_bucket_side"),
    ({"resolution": 512, "min_bucket_side": 1024}, "min_bucket_side"),
    ({"resolution": 512, "max_bucket_side": 256}, "max_bucket_side"),
    ({"caption_extension": "."}, "caption_extension"),
])
def test_config_names_the_wrong_field(overrides, field):
    with pytest.raises(ConfigError, match=rf"^dataset\.{field}:"):
        DatasetConfig(**({"folder": "x"} | overrides))


def test_scan_counts_repeats_reads_captions_and_skips_other_files(dataset):
    entries = {e.name: e for e in scan(dataset, config(dataset))}
    assert sorted(entries) == sorted(IMAGES)
    assert {n: e.repeats for n, e in entries.items()} == {n: 3 if n.startswith("3_") else 1 for n in IMAGES}
    assert entries["tall.webp"].caption == DEFAULT_CAPTION
    assert entries["red.png"].caption == "red, square, plain"
    assert {n: e.size for n, e in entries.items()} == {n: size for n, (size, _) in IMAGES.items()}


def test_relative_folders_are_found_in_the_input_folder(dataset):
    assert resolve_folder(dataset.name, dataset.parent) == dataset
    assert resolve_folder(str(dataset), "/elsewhere") == dataset


def test_exif_orientation_turns_the_image(tmp_path):
    # Stored 96 wide and 64 high, left half red; orientation 6: shown turned 90 degrees clockwise.
    pixels = np.zeros((64, 96, 3), dtype=np.uint8)
    pixels[:, :48, 0] = 255
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6
    Image.fromarray(pixels).save(tmp_path / "turned.jpg", exif=exif, quality=95)
    (entry,) = scan(tmp_path, config(tmp_path))
    assert entry.size == (64, 96)
    shown = load_pixels(entry.path, (64, 96), flip=False)[0]  # (H, W, 3)
    assert shown.shape == (96, 64, 3)
    assert shown[:40, :, 0].mean() > 0.9 and shown[56:, :, 0].mean() < 0.1  # the red half is on top


def test_images_are_resized_to_cover_and_centre_cropped(tmp_path):
    pixels = np.zeros((64, 256, 3), dtype=np.uint8)  # green | red | blue, 64 + 128 + 64 wide
    pixels[:, :64, 1] = pixels[:, 64:192, 0] = pixels[:, 192:, 2] = 255
    Image.fromarray(pixels).save(tmp_path / "bands.png")
    cropped = load_pixels(tmp_path / "bands.png", (64, 64), flip=False)[0]
    assert cropped.shape == (64, 64, 3)
    torch.testing.assert_close(cropped.mean((0, 1)), torch.tensor([1.0, 0.0, 0.0]), atol=0.02, rtol=0)


@pytest.mark.parametrize("resolution", [64, 128, 512, 1024])
def test_buckets_have_sides_of_multiples_of_64_and_an_area_near_the_resolution_squared(resolution):
    bounds = config("x", resolution=resolution).bucket_bounds
    buckets = bucket_sizes(resolution, *bounds)
    assert (resolution, resolution) in buckets
    for width, height in buckets:
        assert width % 64 == 0 and height % 64 == 0
        assert bounds[0] <= min(width, height) and max(width, height) <= bounds[1]
        # The longest side of multiples of 64 under the area: within one 64-wide strip of it.
        assert resolution**2 - 64 * max(width, height) < width * height <= resolution**2
        assert (height, width) in buckets


def test_images_go_to_the_bucket_nearest_their_aspect_ratio():
    buckets = bucket_sizes(1024, 512, 2048)
    assert nearest_bucket((3000, 3000), buckets) == (1024, 1024)
    assert nearest_bucket((1920, 1080), buckets) == (1344, 768)
    assert nearest_bucket((1080, 1920), buckets) == (768, 1344)
    assert nearest_bucket((100, 10_000), buckets) == (512, 2048)  # the most extreme there is
    assert bucket_sizes(64, 64, 128) == [(64, 64)]


def test_missing_and_empty_folders_and_broken_files_are_named(tmp_path):
    with pytest.raises(ConfigError, match="dataset.folder: .*missing is not a folder .*looked up in"):
        resolve_folder("missing", tmp_path)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "caption.txt").write_text("no image here")
    with pytest.raises(ConfigError, match="empty holds no images"):
        scan(tmp_path / "empty", config("x"))

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "garbage.png").write_bytes(b"not an image")
    with pytest.raises(DatasetError, match="garbage.png: cannot be read as an image"):
        scan(broken, config("x"))
    noise_image((64, 64), 0).save(broken / "garbage.png")
    data = (broken / "garbage.png").read_bytes()
    (broken / "garbage.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetError, match="garbage.png: cannot be read as an image"):
        scan(broken, config("x"))
    (broken / "garbage.png").write_bytes(data)
    (broken / "garbage.txt").write_bytes(b"\xff\xfe bad")
    with pytest.raises(DatasetError, match="garbage.txt: cannot be read as UTF-8"):
        scan(broken, config("x"))


# -- captions ------------------------------------------------------------------------------------


def test_the_trigger_word_goes_in_front_only_where_it_is_missing():
    cfg = config("x")
    assert caption_variants("a dog, grass", cfg, "a") == ["sks, a dog, grass"]
    assert caption_variants("a photo of SKS dog", cfg, "a") == ["a photo of SKS dog"]
    assert caption_variants("", cfg, "a") == ["sks"]
    assert caption_variants("asks, dog", cfg, "a") == ["sks, asks, dog"]  # a whole word, not a part
    assert caption_variants("a dog", config("x", trigger_word=""), "a") == ["a dog"]


def test_tag_shuffling_keeps_the_first_tags_and_is_seeded():
    tags = [f"tag{i}" for i in range(8)]
    cfg = config("x", shuffle_tags=True, keep_tags=2, shuffle_variants=5)
    variants = caption_variants(", ".join(tags), cfg, "image.png")
    assert len(variants) == 5 and len(set(variants)) == 5
    assert variants[0] == "sks, " + ", ".join(tags)  # the written order first
    for variant in variants:
        assert variant.split(", ")[:3] == ["sks", "tag0", "tag1"]
        assert sorted(variant.split(", ")[3:]) == tags[2:]
    assert caption_variants(", ".join(tags), cfg, "image.png") == variants
    assert caption_variants(", ".join(tags), cfg, "other.png") != variants
    # Fewer orders than asked for exist: each once.
    assert caption_variants("a, b", cfg, "image.png") == ["sks, a, b"]


def test_captions_of_any_length_are_encoded_at_one_length_per_stream():
    clip = build_clip("sd3")  # CLIP-L, CLIP-G and T5
    texts = ["", "a cat", "word " * 100, "word " * 300]  # 1, 1, 2 and 4 CLIP chunks of 77 tokens
    tokenized = {text: clip.tokenize(text) for text in texts}
    tokens = equal_length_tokens(tokenized, clip.tokenize(""))
    longest = tokenized["word " * 300]
    for stream in ("l", "g"):  # cut to 3 chunks, then repeated to lcm(1, 2, 3) = 6 chunks
        assert tokens["a cat"][stream] == tokenized["a cat"][stream] * 6
        assert tokens["word " * 100][stream] == tokenized["word " * 100][stream] * 3
        assert tokens["word " * 300][stream] == longest[stream][:3] * 2
    t5_length = len(longest["t5xxl"][0])
    assert t5_length > 77
    for text in texts:  # padded with T5's pad token to the longest caption
        (chunk,) = tokens[text]["t5xxl"]
        (written,) = tokenized[text]["t5xxl"]
        assert len(chunk) == t5_length and chunk[: len(written)] == written
        assert set(chunk[len(written) :]) <= {(0, 1.0)}


def test_repeated_clip_chunks_encode_to_comfyuis_own_repeated_conditioning():
    clip = build_clip("sdxl")
    tokens = equal_length_tokens({t: clip.tokenize(t) for t in ("a cat", "word " * 100)}, clip.tokenize(""))
    cond, pooled = clip.encode_from_tokens(tokens["a cat"], return_pooled=True)
    plain, plain_pooled = clip.encode_from_tokens(clip.tokenize("a cat"), return_pooled=True)
    assert cond.shape[1] == 2 * 77
    torch.testing.assert_close(cond, plain.repeat(1, 2, 1))  # as comfy.conds.CONDCrossAttn pads to batch
    torch.testing.assert_close(pooled, plain_pooled)


# -- building samples ----------------------------------------------------------------------------


def test_build_counts_repeats_and_flips_and_encodes_every_caption_variant(sdxl_build):
    samples, report, clip, vae, _ = sdxl_build
    # 3 images once and one 3 times, each also mirrored.
    assert (report.images, report.samples, len(samples)) == (4, 12, 12)
    assert report.buckets == {(64, 64): 12}
    keys = [s.key for s in samples]
    assert keys.count("3_person/face.png") == 3 and keys.count("3_person/face.png (flipped)") == 3
    assert vae.encoded == report.latents_encoded == 8 and report.latents_cached == 0

    captions = report.captions
    assert [text for _, text in captions["tall.webp"]] == ["sks, an image", ""]
    assert [text for _, text in captions["wide.jpg"]][0] == "a wide photo, sky, sks"  # has the trigger
    person = [text for _, text in captions["3_person/face.png"]]
    assert len(person) == 4 and all(t.startswith("sks, person, ") for t in person[:3]) and person[3] == ""
    encoded = {text for variants in captions.values() for _, text in variants}
    assert clip.tokenized == encoded
    assert clip.encoded == report.captions_encoded == len(encoded)


def test_caption_dropout_is_the_empty_caption_with_its_probability(sdxl_build):
    samples, report, clip, _, _ = sdxl_build
    cond, pooled = clip.clip.encode_from_tokens(clip.clip.tokenize(""), return_pooled=True)
    for sample in samples:
        probabilities = [p for p, _ in report.captions[sample.key]]
        assert [p for p, _ in sample.alternatives] == probabilities[1:]
        assert sum(probabilities) == pytest.approx(1.0)
        probability, dropped = sample.alternatives[-1]
        assert probability == 0.2
        torch.testing.assert_close(dropped["context"], cond[0])
        assert not torch.equal(sample.conditioning["context"], cond[0])


def test_every_conditioning_has_the_same_shapes(sdxl_build):
    samples = sdxl_build[0]
    shapes = {k: v.shape for k, v in samples[0].conditioning.items()}
    for sample in samples:
        for conditioning in [sample.conditioning, *(c for _, c in sample.alternatives)]:
            assert {k: v.shape for k, v in conditioning.items()} == shapes


def test_a_flipped_sample_holds_the_latents_of_the_mirrored_image(sdxl_build, dataset):
    samples = {s.key: s for s in sdxl_build[0]}
    pixels = torch.from_numpy(np.asarray(Image.open(dataset / "red.png"), dtype=np.float32) / 255).unsqueeze(0)
    vae, model = build_vae(4), MODEL_FACTORIES["sdxl_eps"]().model
    for key, image in (("red.png", pixels), ("red.png (flipped)", pixels.flip(2))):
        with torch.inference_mode():  # the session's VAE may hold inference tensors from an earlier test's node
            expected = model.process_latent_in(vae.encode(image))[0]
        torch.testing.assert_close(samples[key].latents, expected)
    assert not torch.allclose(samples["red.png"].latents, samples["red.png (flipped)"].latents, atol=1e-3)


def test_the_vae_and_text_encoders_leave_the_device(sdxl_build, dataset):
    cache = sdxl_build[-1]
    patcher, clip, vae = encoders("sdxl")
    with torch.inference_mode():  # as ComfyUI runs nodes
        vae.encode(torch.zeros(1, 64, 64, 3))
        clip.encode_from_tokens(clip.tokenize("x"))

    def loaded(model):
        return any(m.model is not None and m.model.is_clone(model) for m in model_management.current_loaded_models)

    assert loaded(vae.patcher) and loaded(clip.patcher)
    build_samples(config(dataset, **FULL), patcher, clip, vae, input_dir=cache, output_dir=cache)  # all cached
    assert not loaded(vae.patcher) and not loaded(clip.patcher)


def test_a_second_build_reads_the_cache_and_a_change_recomputes_only_its_entries(sdxl_build, dataset, tmp_path):
    first, _, _, _, cache = sdxl_build
    folder = tmp_path / "dataset"
    shutil.copytree(dataset, folder)
    shutil.copytree(cache, tmp_path / "cache")

    samples, report, clip, vae = build(config(folder, **FULL), "sdxl", tmp_path / "cache")
    assert (vae.encoded, clip.encoded, report.latents_encoded, report.captions_encoded) == (0, 0, 0, 0)
    assert report.latents_cached == 8 and report.captions_cached == len(clip.tokenized)
    for before, after in zip(first, samples, strict=True):
        assert before.key == after.key and torch.equal(before.latents, after.latents)
        assert all(torch.equal(before.conditioning[k], after.conditioning[k]) for k in before.conditioning)

    # A new caption: only its variants are encoded.
    (folder / "red.txt").write_text("red, round, shiny")
    _, report, clip, vae = build(config(folder, **FULL), "sdxl", tmp_path / "cache")
    assert vae.encoded == 0 and clip.encoded == len(report.captions["red.png"]) - 1  # "" is cached
    # New pixels: only that image and its mirror are encoded.
    noise_image((64, 64), 99).save(folder / "red.png")
    _, report, clip, vae = build(config(folder, **FULL), "sdxl", tmp_path / "cache")
    assert (vae.encoded, clip.encoded) == (2, 0)
    # A new trigger word changes every caption, none of the images.
    _, report, clip, vae = build(config(folder, **FULL, trigger_word="zzz"), "sdxl", tmp_path / "cache")
    assert vae.encoded == 0 and clip.encoded == report.captions_encoded > 0
    assert report.captions_cached == 1  # the empty caption


def test_a_vae_of_another_family_is_refused(dataset, tmp_path):
    patcher, clip, _ = encoders("flux")
    with pytest.raises(DatasetError, match="4-channel latents, the model takes 16"):
        build_samples(config(dataset), patcher, clip, build_vae(4), input_dir=tmp_path, output_dir=tmp_path)


def test_fingerprints_follow_the_weights():
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(300, 200), torch.nn.LayerNorm(200))
    fingerprint = model_fingerprint(module)
    assert model_fingerprint(module) == fingerprint
    assert model_fingerprint(module, "other setting") != fingerprint
    with torch.no_grad():
        module[0].weight.mul_(1.01)  # what fine-tuning does to a tensor: it changes nearly every value
    assert model_fingerprint(module) != fingerprint


@pytest.mark.parametrize("family", list(MODELS))
def test_samples_train_every_family(family, dataset, tmp_path):
    cfg = config(dataset, shuffle_tags=True, shuffle_variants=2, caption_dropout=0.5)
    with torch.inference_mode():  # as ComfyUI runs nodes
        samples, report, _, _ = build(cfg, family, tmp_path)
    dims = text_encoder_dims(family)
    for sample in samples:
        assert sample.latents.shape == (LATENT_CHANNELS[family], 8, 8)
        for _, conditioning in [(1.0, sample.conditioning), *sample.alternatives]:
            assert conditioning["context"].shape == (dims.tokens, dims.context_dim)
            y_width = dims.pooled_dim + 6 * 256 if family == "sdxl" else dims.pooled_dim  # SDXL: + size embeddings
            assert conditioning["y"].shape == (y_width,)
    patcher = MODEL_FACTORIES[MODELS[family][0]]()
    train = TrainConfig(steps=2, batch_size=2, precision="fp32", gradient_checkpointing=False, seed=3)
    losses = []
    Trainer(patcher, samples, LoraConfig(rank=4), train).run(lambda t, reports: losses.extend(r.loss for r in reports))
    assert len(losses) == 2 and all(np.isfinite(losses))
