"""`buf breaking` (WIRE_JSON) against the API reference, proto/reference/api.json: the API
as last released, or as last changed incompatibly on purpose (scripts/api_reference.sh
records it; README.md, "Changing the API", says when)."""

from __future__ import annotations

import shutil
from pathlib import Path

from processes import run, venv_tool

ROOT = Path(__file__).resolve().parents[2]
REFERENCE = ROOT / "proto" / "reference" / "api.json"


async def _breaking(module_root: Path) -> tuple[int, str]:
    done = await run(
        [venv_tool("buf", "buf-bin"), "breaking", "--against", str(REFERENCE)],
        cwd=module_root,
        timeout=120,
    )
    return done.code, done.out + done.err


async def test_the_api_keeps_the_reference_wire_and_json_compatible() -> None:
    code, output = await _breaking(ROOT)
    assert code == 0, (
        f"buf breaking against {REFERENCE.relative_to(ROOT)}:\n{output}\nIf this break is "
        "deliberate, say so in CHANGELOG.md and run scripts/api_reference.sh"
    )


async def test_a_removed_field_is_caught(tmp_path: Path) -> None:
    """The check can fail: the same protos with Task.id deleted are refused."""
    shutil.copy(ROOT / "buf.yaml", tmp_path / "buf.yaml")
    shutil.copytree(ROOT / "proto" / "conveyor", tmp_path / "proto" / "conveyor")
    task_proto = tmp_path / "proto" / "conveyor" / "v1" / "task.proto"
    text = task_proto.read_text()
    assert "  string id = 1;\n" in text
    task_proto.write_text(text.replace("  string id = 1;\n", "", 1))
    code, output = await _breaking(tmp_path)
    assert code != 0
    assert 'Previously present field "1" with name "id" on message "Task" was deleted' in output
