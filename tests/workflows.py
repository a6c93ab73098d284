"""Workflows in ComfyUI's two formats, and the settings that make a training workflow run tiny.

The UI format (what the frontend saves and what `example_workflows/` holds) lists nodes with their
widget values in widget order, and links as [id, origin node, origin slot, target node, target slot,
type]. The API format (what POST /prompt takes) maps node ids to {"class_type", "inputs"}, where an
input is a value or a link [origin node id, origin slot]. `ui_to_api` converts like the frontend's
"Save (API)", reading widget order from the server's /object_info.
"""

from collections.abc import Iterator

# Nodes the frontend keeps to itself; they never reach the server.
FRONTEND_ONLY_NODES = {"Note", "MarkdownNote"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
# The frontend gives these INT inputs a "control after generate" widget unless told otherwise,
# whose value follows the input's in widgets_values.
SEED_NAMES = ("seed", "noise_seed")
CONTROL_VALUES = ("fixed", "increment", "decrement", "randomize")
MODEL_SUFFIXES = (".safetensors", ".sft", ".ckpt", ".pt", ".pth", ".bin", ".gguf")
NO_FILE = "(none)"
# Sizes and lengths that make a training workflow finish in seconds on a CPU with the tiny models.
TINY_RUN = {
    "LoraTrainer_Dataset": {"resolution": 64},
    "LoraTrainer_TrainLoRA": {"steps": 4, "save_every": 2, "sample_every": 2, "sample_size": 64, "warmup_steps": 1},
    "LoraTrainer_SamplePreview": {"width": 64, "height": 64, "steps": 4},
    "KSampler": {"steps": 4},
    "EmptyLatentImage": {"width": 64, "height": 64},
    "EmptySD3LatentImage": {"width": 64, "height": 64},
}


def input_specs(info: dict) -> Iterator[tuple[str, object, dict]]:
    """(name, type, options) of a node's required and optional inputs, in the node's order; the type is
    a string, or the list of choices of an old-style combo."""
    for section in ("required", "optional"):
        for name in info.get("input_order", {}).get(section, []):
            spec = info["input"][section][name]
            yield name, spec[0], spec[1] if len(spec) > 1 else {}


def is_widget(kind, options: dict) -> bool:
    return (isinstance(kind, list) or kind in WIDGET_TYPES) and not options.get("forceInput", False)


def widget_slots(info: dict) -> list[str | None]:
    """The input behind each entry of a node's widgets_values; None for a control-after-generate value."""
    slots = []
    for name, kind, options in input_specs(info):
        if not is_widget(kind, options):
            continue
        slots.append(name)
        control = options.get("control_after_generate")
        if kind == "INT" and (name in SEED_NAMES if control is None else control):
            slots.append(None)
    return slots


def combo_choices(kind, options: dict) -> list | None:
    """The allowed values of a combo input (old style: the type is the list; new style: "COMBO")."""
    if isinstance(kind, list):
        return kind
    return options.get("options") if kind == "COMBO" else None


def widget_values(node: dict, info: dict) -> list[tuple[str | None, object]]:
    """(input name or None, value) of each widget value of a UI-format node; raises on a count mismatch."""
    slots = widget_slots(info)
    values = node.get("widgets_values", [])
    if len(values) != len(slots):
        raise ValueError(
            f"node {node['id']} ({node['type']}) has {len(values)} widget values; its widgets are {slots}"
        )
    return list(zip(slots, values, strict=True))


def problems(workflow: dict, object_info: dict) -> list[str]:
    """What keeps a UI-format workflow from loading and running as saved: node types the server lacks,
    links that do not fit the nodes they join, widget values that do not fit their inputs. Model file
    names are only checked to look like one: the files need not be on this server."""
    found = []
    nodes = {node["id"]: node for node in workflow["nodes"]}
    for node in workflow["nodes"]:
        if node["type"] in FRONTEND_ONLY_NODES:
            continue
        where = f"node {node['id']} ({node['type']})"
        info = object_info.get(node["type"])
        if info is None:
            found.append(f"{where}: the server has no such node")
            continue
        try:
            values = widget_values(node, info)
        except ValueError as error:
            found.append(str(error))
            continue
        specs = {name: (kind, options) for name, kind, options in input_specs(info)}
        linked = {slot["name"] for slot in node.get("inputs", []) if slot.get("link") is not None}
        for name, value in values:
            if name is None:
                problem = None if value in CONTROL_VALUES else f"is not one of {CONTROL_VALUES}"
            else:
                problem = None if name in linked else value_problem(value, *specs[name])
            if problem:
                found.append(f"{where}, {name or 'control after generate'} = {value!r}: {problem}")
    for link_id, origin, origin_slot, target, target_slot, kind in workflow["links"]:
        if origin not in nodes or target not in nodes:
            found.append(f"link {link_id}: joins a node that is not in the workflow")
            continue
        output = object_info[nodes[origin]["type"]]["output"][origin_slot]
        slot = nodes[target]["inputs"][target_slot]
        accepted = {name: kind for name, kind, _ in input_specs(object_info[nodes[target]["type"]])}
        if slot.get("link") != link_id or link_id not in nodes[origin]["outputs"][origin_slot]["links"]:
            found.append(f"link {link_id}: the nodes it joins do not list it on those slots")
        if kind != output or not (output == "*" or output == accepted.get(slot["name"])):
            found.append(f"link {link_id}: {output} from node {origin} does not fit input {slot['name']!r} of "
                         f"node {target} (link type {kind})")
    return found


def value_problem(value, kind, options: dict) -> str | None:
    choices = combo_choices(kind, options)
    if choices is not None:
        if value in choices or (is_file_list(choices) and str(value).endswith(MODEL_SUFFIXES)):
            return None
        return f"is not one of {choices}"
    expected = {"INT": int, "FLOAT": (int, float), "BOOLEAN": bool, "STRING": str}[kind]
    if not isinstance(value, expected) or (kind != "BOOLEAN" and isinstance(value, bool)):
        return f"is not a {kind}"
    if kind in ("INT", "FLOAT") and not options.get("min", value) <= value <= options.get("max", value):
        return f"is outside [{options.get('min')}, {options.get('max')}]"
    return None


def is_file_list(choices: list) -> bool:
    """A combo of model files (the pack's loaders add "(none)"): its choices depend on the server's folders."""
    return all(choice == NO_FILE or str(choice).endswith(MODEL_SUFFIXES) for choice in choices)


def ui_to_api(workflow: dict, object_info: dict) -> dict:
    """The API-format graph of a UI-format workflow (only nodes that run: mode 0)."""
    links = {link[0]: link for link in workflow["links"]}
    graph = {}
    for node in workflow["nodes"]:
        if node["type"] in FRONTEND_ONLY_NODES:
            continue
        if node.get("mode", 0) != 0:
            raise ValueError(f"node {node['id']} ({node['type']}) is muted or bypassed; only active nodes convert")
        inputs = {name: value for name, value in widget_values(node, object_info[node["type"]]) if name}
        for slot in node.get("inputs", []):
            if slot.get("link") is not None:
                _, origin, origin_slot, *_ = links[slot["link"]]
                inputs[slot["name"]] = [str(origin), origin_slot]
        graph[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return graph


def set_inputs(graph: dict, settings: dict[str, dict]) -> dict:
    """Overrides inputs by node type, e.g. {"KSampler": {"steps": 4}}, in place; returns `graph`."""
    for node in graph.values():
        node["inputs"].update(settings.get(node["class_type"], {}))
    return graph


def nodes_of(graph: dict, class_type: str) -> list[dict]:
    return [node for node in graph.values() if node["class_type"] == class_type]
