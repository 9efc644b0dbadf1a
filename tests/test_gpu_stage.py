"""benchmarks/gpu_stage.py: the models cut into transfers a GPU machine can receive, and joined there byte for byte;
a model whose chunks did not all arrive, or arrived damaged, is left out and said to be."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from gpu_stage import MANIFEST, stage, unpack  # noqa: E402


def files(tmp_path: Path) -> list[tuple[str, str, Path]]:
    """Three weights files of two models, of sizes that fall across chunk boundaries."""
    sizes = {("small", "small_pkg", "small.gguf"): 2500, ("split", "split_part1", "part01.bin"): 4096,
             ("split", "split_part2", "part02.bin"): 777}
    out = []
    for i, ((model, package, name), size) in enumerate(sizes.items()):
        path = tmp_path / "installed" / package / name
        path.parent.mkdir(parents=True)
        path.write_bytes(bytes((i * 7 + j * 13) % 256 for j in range(size)))
        out.append((model, package, path))
    return out


def test_every_file_comes_back_whole_from_chunks_that_each_fit_a_call(tmp_path):
    parts = files(tmp_path)
    stage_dir, site = tmp_path / "stage", tmp_path / "site"
    calls = stage(parts, 3000, stage_dir, wheels=False)
    chunks = sorted(stage_dir.glob("chunk.*"))
    assert [c.stat().st_size for c in chunks] == [3000, 3000, 1373]  # 7,373 bytes laid end to end
    assert [len(call["carry"]) for call in calls] == [1, 1, 2]  # the manifest rides with the last chunk
    assert calls[-1]["command"] == "bash benchmarks/gpu_check.sh"
    assert unpack(stage_dir, site) == ["small", "split"]
    for _, package, path in parts:
        assert (site / package / path.name).read_bytes() == path.read_bytes()
        assert (site / package / "__init__.py").is_file()  # found as the package that holds it


def test_a_model_with_a_chunk_missing_or_damaged_is_left_out_and_named(tmp_path, capsys):
    parts = files(tmp_path)
    stage_dir = tmp_path / "stage"
    stage(parts, 3000, stage_dir, wheels=False)
    manifest = json.loads((stage_dir / MANIFEST).read_text())
    (stage_dir / manifest["chunks"][-1]).unlink()  # the split model's last part did not arrive
    assert unpack(stage_dir, tmp_path / "site") == ["small"]
    assert "split: not carried here: chunk.002" in capsys.readouterr().err
    (stage_dir / "chunk.000").write_bytes(b"x" * 3000)  # the small model's chunk, damaged
    assert unpack(stage_dir, tmp_path / "site2") == []
    assert "small_pkg/small.gguf: sha256" in capsys.readouterr().err


def test_the_manifest_gets_a_call_of_its_own_when_the_last_chunk_is_full(tmp_path):
    parts = files(tmp_path)[:1]  # 2,500 bytes: chunks of 1,250, the last one full
    calls = stage(parts, 1250, tmp_path / "stage", wheels=False)
    assert [call["carry"] for call in calls][-1] == [str(tmp_path / "stage" / MANIFEST)]
    assert len(calls) == 3 and all(call["command"] == "true" for call in calls[:-1])
