"""The YAML file of headless training: ai-toolkit's layout, checked key by key with line numbers.

Two forms are read. ai-toolkit's: `job: extension`, `config: {name, process: [{type: sd_trainer, ...}]}`
(one process), and the short one with the process's keys (`name`, `model`, `network`, `train`,
`datasets`, `sample`, `save`, ...) at the top level. Both resolve to the short form with every default
filled in (`ResolvedConfig.values`), which `--print-config` shows.

The document is composed (`yaml.compose`), not loaded, so every value keeps its line: errors and
unknown keys are reported as `FILE:LINE: dotted.path: what is wrong`. Relative paths are taken from
the YAML file's folder. Plain YAML reads `1e-4` as a string; float keys accept such strings.

What the file shows is what is read: a key written twice is an error naming both lines; a value
reached through an alias (`*name`) where a value or a list of values is expected is refused before it
is built (an alias of an alias of a list grows exponentially: the "billion laughs"); YAML tags that
build objects (`!!python/...`) are refused; messages show at most a short prefix of a value.
"""

import logging
import math
import re
import reprlib
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from yaml.constructor import SafeConstructor

from .config import (
    ALGORITHMS,
    BLOCKS_TO_SWAP_AUTO,
    MAX_BLOCKS_TO_SWAP,
    MAX_LEARNING_RATE,
    MAX_STEPS,
    OPTIMIZERS,
    SAVE_FORMATS,
    SCHEDULES,
    TEXT_ENCODER_PRESETS,
    ConfigError,
)

log = logging.getLogger(__name__)

REQUIRED = object()
DTYPE_NAMES = {"bf16": "bf16", "bfloat16": "bf16", "fp16": "fp16", "float16": "fp16", "half": "fp16",
               "fp32": "fp32", "float32": "fp32", "float": "fp32"}
# Family flags of ai-toolkit and the family (as detected from the weights) each one claims.
FAMILY_FLAGS = {"is_flux": "flux", "is_v3": "sd3", "is_xl": "sdxl"}
NOISE_SCHEDULERS = ("flowmatch", "ddpm", "")
# A config is a few kilobytes; this bounds what is read, e.g. from a device file given by mistake.
MAX_CONFIG_BYTES = 1 << 20
# No integer setting means more (seeds are 32-bit in the nodes); larger ones overflow the libraries.
MAX_INT = 2**32 - 1
LIST_KINDS = ("strings", "files", "resolution")
EXPECTED = {"int": "an integer", "float": "a number", "bool": "true or false",
            "resolution": "an integer or a list of integers", "strings": "a list of strings",
            "files": "a list of strings", "count_or_auto": "an integer >= 0 or 'auto'"}
# Values in messages: a short prefix of a string, the first items of a list.
SHOWN = reprlib.Repr()
SHOWN.maxstring = SHOWN.maxother = 80
SHOWN.maxlist = 4


class ConfigFileError(ConfigError):
    """The YAML file cannot be used; the message names the file, line and dotted key."""


@dataclass(frozen=True)
class Key:
    """kind: int, float, bool, str, strings (list of str), resolution (int or list of ints), file,
    folder (both must exist), path (an output location), files (list of files), section (a mapping of
    the keys in `keys`, e.g. ai-toolkit's train.ema_config)."""

    kind: str
    default: object = REQUIRED
    choices: tuple | dict = ()
    aliases: tuple[str, ...] = ()
    minimum: float | None = None
    maximum: float | None = None
    keys: dict | None = None


MODEL = {
    "name_or_path": Key("file"),
    "is_flux": Key("bool", False),
    "is_v3": Key("bool", False),
    "is_xl": Key("bool", False),
    "quantize": Key("bool", False),
    "vae_path": Key("file", ""),
    "text_encoder_paths": Key("files", []),
}
NETWORK = {
    # ai-toolkit's names; LoCon is `lora` with a conv target preset here.
    "type": Key("str", "lora", ALGORITHMS),
    "lokr_factor": Key("int", -1),
    "lokr_full_rank": Key("bool", False),
    "linear": Key("int", 16),
    "linear_alpha": Key("float", 16.0),
    "dropout": Key("float", 0.0),
    # Which text encoders get a LoRA too (ours; ai-toolkit's train.train_text_encoder: true means "clip").
    "text_encoders": Key("str", "none", tuple(TEXT_ENCODER_PRESETS)),
}
SAVE = {
    "dtype": Key("str", "bf16", DTYPE_NAMES),
    "save_every": Key("int", 250),
    "max_step_saves_to_keep": Key("int", 3),
    "format": Key("str", "comfyui", SAVE_FORMATS),
}
TRAIN = {
    "batch_size": Key("int", 1),
    "steps": Key("int", 1000, maximum=MAX_STEPS),
    "gradient_accumulation": Key("int", 1, aliases=("gradient_accumulation_steps",)),
    "lr": Key("float", 1e-4, maximum=MAX_LEARNING_RATE),
    "train_text_encoder": Key("bool", False),
    # ai-toolkit's default is train.lr; 0 says the same here.
    "text_encoder_lr": Key("float", 0.0, maximum=MAX_LEARNING_RATE),
    "optimizer": Key("str", "adamw8bit", OPTIMIZERS),
    "lr_scheduler": Key("str", "constant", SCHEDULES),
    "warmup_steps": Key("int", 0),
    "max_grad_norm": Key("float", 1.0),
    "gradient_checkpointing": Key("bool", True),
    # kohya's name; "auto" (or -1) swaps the fewest blocks that fit (TrainConfig.blocks_to_swap).
    "blocks_to_swap": Key("count_or_auto", BLOCKS_TO_SWAP_AUTO, maximum=MAX_BLOCKS_TO_SWAP),
    "noise_scheduler": Key("str", "", NOISE_SCHEDULERS),
    "dtype": Key("str", "bf16", DTYPE_NAMES),
    "seed": Key("int", 0),
    # Differential output preservation, with ai-toolkit's names and defaults.
    "diff_output_preservation": Key("bool", False),
    "diff_output_preservation_class": Key("str", "person"),
    "diff_output_preservation_multiplier": Key("float", 1.0),
    "validation_every": Key("int", 0, minimum=0),
    "loraplus_lr_ratio": Key("float", 1.0),
    # ai-toolkit's EMA settings; use_ema false leaves ema_decay unused.
    "ema_config": Key("section", keys={"use_ema": Key("bool", False), "ema_decay": Key("float", 0.999)}),
}
DATASET = {
    "folder_path": Key("folder"),
    "caption_ext": Key("str", "txt"),
    "default_caption": Key("str", ""),
    "caption_dropout_rate": Key("float", 0.05),
    "shuffle_tokens": Key("bool", False),
    "keep_tokens": Key("int", 0),
    "flip_x": Key("bool", False),
    "cache_latents_to_disk": Key("bool", True),
    "resolution": Key("resolution", 1024),
    "num_repeats": Key("int", 1, minimum=1),
    "mask_path": Key("folder", ""),
    "alpha_mask": Key("bool", False),
    "is_reg": Key("bool", False),
    "loss_multiplier": Key("float", 1.0),
    "validation_split": Key("float", 0.0),
    "validation_folder": Key("folder", ""),
}
SAMPLE = {
    "sample_every": Key("int", 250, minimum=0),
    "width": Key("int", 1024),
    "height": Key("int", 1024),
    "prompts": Key("strings", []),
    "neg": Key("str", ""),
    "seed": Key("int", 42),
    "guidance_scale": Key("float", 0.0),
    "sample_steps": Key("int", 0),
}
SECTIONS = {"model": MODEL, "network": NETWORK, "save": SAVE, "train": TRAIN, "sample": SAMPLE}
PROCESS = {
    "name": Key("str"),
    "training_folder": Key("path", "output"),
    "trigger_word": Key("str", ""),
    # ComfyUI picks the device (`--cpu` forces the CPU); accepted so ai-toolkit files read cleanly.
    "device": Key("str", ""),
}
JOB_KEYS = ("job", "config", "meta")


@dataclass
class ResolvedConfig:
    """The short form with defaults filled in (`values`), and where each value came from."""

    file: Path
    values: dict
    # Short-form dotted path -> (dotted path as written, line); sections too.
    origins: dict[str, tuple[str, int]] = field(default_factory=dict)
    unknown: list[str] = field(default_factory=list)

    def where(self, path: str) -> str:
        """`FILE:LINE: path-as-written` of a short-form dotted path, or of its nearest written parent."""
        probe = path
        while probe not in self.origins and ("." in probe or "[" in probe):
            probe = probe[: max(probe.rfind("."), probe.rfind("["))]
        written, line = self.origins.get(probe, (path, 1))
        if probe != path:
            written += path[len(probe):]
        return f"{self.file}:{line}: {written}"

    def error(self, path: str, message: str) -> ConfigFileError:
        return ConfigFileError(f"{self.where(path)}: {message}")


def load(path: str | Path, strict: bool = False) -> ResolvedConfig:
    """Reads and checks a config file. Unknown keys are logged as warnings, or raised with `strict`."""
    path = Path(path)
    root = compose_file(path)
    reader = _Reader(ResolvedConfig(path, {}), path.resolve().parent)
    if not isinstance(root, yaml.MappingNode):
        raise ConfigFileError(f"{path}: the file must hold a mapping (the short form, or ai-toolkit's job/config)")
    items = reader.items(root, "")
    if "config" in items or "job" in items:
        process, prefix = reader.job_process(root, items)
    else:
        process, prefix = root, ""
    reader.read_process(process, prefix)
    config = reader.config
    if config.unknown:
        if strict:
            raise ConfigFileError("unknown keys (--strict makes them errors):\n" + "\n".join(config.unknown))
        for message in config.unknown:
            log.warning("%s; ignored", message)
    return config


def compose_file(path: Path) -> yaml.Node | None:
    """The file's YAML node tree; errors name the line of what cannot be read."""
    try:
        with path.open("rb") as file:
            data = file.read(MAX_CONFIG_BYTES + 1)
    except OSError as error:
        raise ConfigFileError(f"{path}: cannot be read ({error})") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigFileError(f"{path}: is larger than {MAX_CONFIG_BYTES >> 20} MiB; is it the YAML config file?")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise ConfigFileError(f"{path}:{line}: byte 0x{data[error.start]:02x} is not UTF-8 text: give the YAML "
                              "config file, saved as UTF-8") from None
    try:
        # Composing builds nodes only: no value is built yet, and an alias is one node however often used.
        return yaml.compose(text, Loader=_MarkingAliases)
    except yaml.MarkedYAMLError as error:
        line = error.problem_mark.line + 1 if error.problem_mark else 1
        raise ConfigFileError(f"{path}:{line}: is not valid YAML: {error.problem or error}") from None
    except yaml.YAMLError as error:
        # The reader's errors (a control character, e.g. of a binary file) give a character position.
        position = getattr(error, "position", 0)
        line = text.count("\n", 0, position) + 1
        raise ConfigFileError(f"{path}:{line}: is not valid YAML: {getattr(error, 'reason', error)}") from None


class _MarkingAliases(yaml.SafeLoader):
    """Composes as the safe loader does, but every use of an alias gives a copy of the anchored node
    that carries the alias's name and place, so the reader can tell it from the anchored value."""

    def compose_node(self, parent, index):
        if not self.check_event(yaml.AliasEvent):
            return super().compose_node(parent, index)
        alias = self.peek_event()
        node = super().compose_node(parent, index)
        marked = type(node)(node.tag, node.value, alias.start_mark, alias.end_mark)
        marked.alias = alias.anchor
        return marked


def dotted(written: str, name: str) -> str:
    return f"{written}.{name}" if written and written != "(top level)" else name


class _Reader:
    def __init__(self, config: ResolvedConfig, base: Path):
        self.config = config
        self.base = base
        self.constructor = SafeConstructor()

    def fail(self, node: yaml.Node, written: str, message: str) -> ConfigFileError:
        return ConfigFileError(f"{self.config.file}:{node.start_mark.line + 1}: {written}: {message}")

    def items(self, node: yaml.MappingNode, written: str) -> dict[str, tuple[yaml.Node, yaml.Node]]:
        """Key text -> (key node, value node) of a mapping."""
        found = {}
        for key, value in node.value:
            if not isinstance(key, yaml.ScalarNode):
                raise self.fail(key, written or "(top level)", "keys must be plain names")
            if key.value in found:
                first = found[key.value][0].start_mark.line + 1
                raise self.fail(key, dotted(written, key.value),
                                f"is written twice, on lines {first} and {key.start_mark.line + 1}: keep one")
            found[key.value] = (key, value)
        return found

    def mapping(self, node: yaml.Node, written: str) -> dict[str, tuple[yaml.Node, yaml.Node]]:
        if not isinstance(node, yaml.MappingNode):
            raise self.fail(node, written, "expected a mapping of keys")
        return self.items(node, written)

    def job_process(self, root: yaml.MappingNode, items: dict) -> tuple[yaml.Node, str]:
        self.report_unknown(items, JOB_KEYS, "")
        if "config" not in items:
            raise self.fail(root, "config", "missing: ai-toolkit's form holds config: {name, process: [...]}")
        config_node = items["config"][1]
        config_items = self.mapping(config_node, "config")
        self.report_unknown(config_items, ("name", "process"), "config")
        if "process" not in config_items:
            raise self.fail(config_node, "config.process", "missing: give a list with one sd_trainer process")
        processes = config_items["process"][1]
        if not isinstance(processes, yaml.SequenceNode) or len(processes.value) != 1:
            raise self.fail(processes, "config.process", "expected a list of exactly one process")
        process = processes.value[0]
        process_items = self.mapping(process, "config.process[0]")
        kind = process_items.pop("type", (None, None))[1]
        # Compared as written, never built: any node but the plain word is refused.
        if not isinstance(kind, yaml.ScalarNode) or hasattr(kind, "alias") or kind.value != "sd_trainer":
            raise self.fail(kind or process, "config.process[0].type", "must be sd_trainer")
        if "name" in config_items and "name" not in process_items:
            # ai-toolkit names the job under config; the process reads it as its own.
            process.value.append(config_items["name"])
        return process, "config.process[0]."

    def read_process(self, node: yaml.Node, prefix: str) -> None:
        items = self.mapping(node, prefix.rstrip(".") or "(top level)")
        items.pop("type", None)
        self.report_unknown(items, (*PROCESS, *SECTIONS, "datasets"), prefix.rstrip("."))
        values = self.config.values
        own = {name: item for name, item in items.items() if name in PROCESS}
        values.update(self.read_keys(node, own, PROCESS, prefix, ""))
        for name, keys in SECTIONS.items():
            if name in items:
                key, section = items[name]
                self.config.origins[name] = (prefix + name, key.start_mark.line + 1)
                values[name] = self.read_keys(key, self.mapping(section, prefix + name), keys,
                                              prefix + name + ".", name + ".")
            elif name == "model":
                raise self.fail(node, prefix + name, "missing: give model.name_or_path at least")
            else:
                values[name] = self.read_keys(node, {}, keys, prefix + name + ".", name + ".")
        self.check_family_flags()
        if "datasets" not in items:
            raise self.fail(node, prefix + "datasets", "missing: give a list of datasets (each with folder_path)")
        key, datasets = items["datasets"]
        written = prefix + "datasets"
        self.config.origins["datasets"] = (written, key.start_mark.line + 1)
        if not isinstance(datasets, yaml.SequenceNode) or not datasets.value or hasattr(datasets, "alias"):
            raise self.fail(datasets, written, "expected a list of datasets, each a mapping with folder_path")
        values["datasets"] = [
            self.read_keys(dataset, self.mapping(dataset, f"{written}[{index}]"), DATASET, f"{written}[{index}].",
                           f"datasets[{index}].")
            for index, dataset in enumerate(datasets.value)
        ]

    def check_family_flags(self) -> None:
        flags = [name for name in FAMILY_FLAGS if self.config.values["model"][name]]
        if len(flags) > 1:
            raise self.config.error(f"model.{flags[1]}", f"contradicts model.{flags[0]}: set at most one family flag")

    def report_unknown(self, items: dict, known, written: str) -> None:
        for name, (key, _) in items.items():
            if name in known:
                continue
            path = f"{written}.{name}" if written else name
            if re.fullmatch(r"is_\w+", name) and written.endswith("model"):
                flags = ", ".join(FAMILY_FLAGS)
                raise self.fail(key, path, f"unknown family flag; the families trained here are set with {flags}")
            self.config.unknown.append(
                f"{self.config.file}:{key.start_mark.line + 1}: {path}: unknown key "
                f"(known here: {', '.join(sorted(known))})"
            )

    def read_keys(self, node: yaml.Node, items: dict, keys: dict[str, Key], written: str, canonical: str) -> dict:
        """The values of `keys` from `items`, defaults where absent; records each value's origin. A
        missing required key is reported at `node`'s line (the section's key)."""
        aliases = {alias: name for name, key in keys.items() for alias in key.aliases}
        self.report_unknown(items, (*keys, *aliases), written.rstrip("."))
        values = {}
        for name, key in keys.items():
            given = [n for n in (name, *key.aliases) if n in items and items[n][1].tag != "tag:yaml.org,2002:null"]
            if len(given) > 1:
                raise self.fail(items[given[1]][0], written + given[1], f"is the same setting as {written}{given[0]}")
            if key.kind == "section":
                key_node, section = items[given[0]] if given else (node, None)
                if given:
                    self.config.origins[canonical + name] = (written + name, key_node.start_mark.line + 1)
                values[name] = self.read_keys(key_node, self.mapping(section, written + name) if given else {},
                                              key.keys, written + name + ".", canonical + name + ".")
                continue
            if not given:
                if key.default is REQUIRED:
                    raise self.fail(node, written + name, "missing: this key is required")
                values[name] = key.default
                continue
            key_node, value_node = items[given[0]]
            self.config.origins[canonical + name] = (written + given[0], key_node.start_mark.line + 1)
            values[name] = self.convert(value_node, written + given[0], key)
        return values

    def plain_value(self, node: yaml.Node, written: str, key: Key):
        """The value of a node that holds a value, or for list kinds a list of values, as written:
        no alias, no other structure, no tag that builds an object. Checked before anything is built."""
        expected = EXPECTED.get(key.kind, "a string")
        is_list = isinstance(node, yaml.SequenceNode) and key.kind in LIST_KINDS
        values = node.value if is_list else [node]
        for item in [node, *values] if is_list else values:
            if hasattr(item, "alias"):
                raise self.fail(item, written, f"is the alias *{item.alias}; aliases are refused where {expected} "
                                "is expected: write the value itself")
            if item.tag not in SafeConstructor.yaml_constructors:
                tag = item.tag.replace("tag:yaml.org,2002:", "!!")
                raise self.fail(item, written, f"the tag {tag} is refused: write a plain value (YAML tags that "
                                "build objects are not read)")
            # Only the list itself may be other than a scalar.
            if not (is_list and item is node) and not isinstance(item, yaml.ScalarNode):
                got = "a list" if isinstance(item, yaml.SequenceNode) else "a mapping"
                raise self.fail(item, written, f"expected {expected}, got {got}")
        try:
            return self.constructor.construct_object(node, deep=True)
        except (yaml.YAMLError, ValueError, TypeError) as error:
            problem = getattr(error, "problem", None) or error
            raise self.fail(node, written, f"cannot be read ({problem})") from None

    def convert(self, node: yaml.Node, written: str, key: Key):
        value = self.plain_value(node, written, key)
        kind = key.kind

        def wrong(expected: str) -> ConfigFileError:
            return self.fail(node, written, f"expected {expected}, got {SHOWN.repr(value)}")

        if kind == "int":
            if isinstance(value, bool) or not isinstance(value, int):
                raise wrong("an integer")
        elif kind == "count_or_auto":
            if value in ("auto", BLOCKS_TO_SWAP_AUTO):
                return BLOCKS_TO_SWAP_AUTO
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise wrong("an integer >= 0 or 'auto'")
        elif kind == "float":
            if isinstance(value, str):
                try:
                    value = float(value)
                except ValueError:
                    raise wrong("a number") from None
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise wrong("a number")
            value = float(value)
            if not math.isfinite(value):
                raise wrong("a finite number")
        elif kind == "bool":
            if not isinstance(value, bool):
                raise wrong("true or false")
        elif kind == "resolution":
            sides = value if isinstance(value, list) else [value]
            if not sides or not all(isinstance(s, int) and not isinstance(s, bool) for s in sides):
                raise wrong("an integer or a list of integers")
            if len(sides) > 1:
                log.info("%s: training at %d, the largest of %s (aspect-ratio buckets of that area)",
                         written, max(sides), sides)
            value = max(sides)
        elif kind in ("strings", "files"):
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise wrong("a list of strings")
            if kind == "files":
                value = [self.existing(node, written, v, "file") for v in value]
        elif not isinstance(value, str):
            raise wrong("a string")
        elif kind in ("file", "folder"):
            value = self.existing(node, written, value, kind) if value else value
        elif kind == "path":
            path = self.base / Path(value).expanduser()
            if path.resolve() == Path(path.resolve().anchor):
                raise self.fail(node, written, f"{SHOWN.repr(value)} is the root of the file system: give a folder "
                                "for this run's files, e.g. output")
            value = str(path)
        if key.choices:
            if value not in key.choices:
                raise self.fail(node, written, f"{SHOWN.repr(value)} is not one of "
                                f"{', '.join(map(repr, key.choices))}")
            if isinstance(key.choices, dict):
                value = key.choices[value]
        maximum = MAX_INT if kind in ("int", "resolution") and key.maximum is None else key.maximum
        if key.minimum is not None and value < key.minimum:
            raise self.fail(node, written, f"must be >= {key.minimum}, got {value!r}")
        if maximum is not None and value > maximum:
            raise self.fail(node, written, f"must be <= {maximum}, got {SHOWN.repr(value)}")
        return value

    def existing(self, node: yaml.Node, written: str, value: str, kind: str) -> str:
        path = self.base / Path(value).expanduser()
        if not (path.is_file() if kind == "file" else path.is_dir()):
            raise self.fail(node, written, f"{path} is not a {kind}")
        return str(path)
