"""The README documents every input of every node the pack registers, with its tooltip."""

from pathlib import Path

from test_server import pack_nodes

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_every_node_input_is_documented_with_its_tooltip() -> None:
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Node inputs", 1)[1].split("\n## ", 1)[0]
    for node in pack_nodes():
        schema = node.define_schema()
        assert f"(`{schema.node_id}`)" in section, schema.node_id
        rows = section.split(f"(`{schema.node_id}`)", 1)[1].split("**", 1)[0]
        for item in schema.inputs:
            assert f"| `{item.id}` |" in rows, f"{schema.node_id}.{item.id} is not in the README"
            if item.tooltip:
                assert item.tooltip.replace("|", "\\|") in rows, f"{schema.node_id}.{item.id}: tooltip differs"
