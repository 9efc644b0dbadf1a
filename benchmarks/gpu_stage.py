"""Carry the models and the missing packages to a lent GPU machine, which reaches no registry, for ``gpu_check.sh``.

The device tool sends the working tree and up to 8 ignored paths a call, 64 MiB in all, and keeps what a call left
on the machine while it stays warm (about 30 s after each call). The models' GGUF files are larger (SmolLM2 94 MiB,
Qwen2.5-0.5B 469 MiB in six parts), so this cuts them into chunks of at most ``--chunk-mib`` under ``.gpu/``
(ignored; the files laid end to end, SmolLM2's first), downloads wheels there for what the GPU image lacks
(``gguf``, ``pydivsufsort``; Python 3.12), writes ``.gpu/manifest.json`` and prints the ``run`` calls that take
them there, one after the other, each within the 30 s the machine stays warm:

    python benchmarks/gpu_stage.py                          # both models: 10 calls
    python benchmarks/gpu_stage.py --models smollm2-135m    # SmolLM2 alone: 2 calls

Each call but the last runs ``true``; the last carries the manifest and the wheels and runs
``bash benchmarks/gpu_check.sh``, which calls ``python3 benchmarks/gpu_stage.py --unpack /tmp/site`` first: each
file whose chunks all arrived is joined, checked against its sha256 and laid out as the package that holds it (so
model loading finds it as it does here), and the wheels are installed. A model with a chunk missing is reported
and left out of the check.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STAGE = ROOT / ".gpu"
MANIFEST = "manifest.json"
# What the GPU image (python3 3.12 with torch, transformers, numba, pyarrow...: the device README's package list)
# lacks of our dependencies for the check; pure Python or manylinux wheels.
WHEELS = ("gguf", "pydivsufsort")
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64")


def model_files(models: list[str]) -> list[tuple[str, str, Path]]:
    """(model, package, GGUF part) of every part of the embedded ``models``, in order."""
    sys.path.insert(0, str(ROOT))
    from retrieval_spec.models import EMBEDDED_MODELS, _gguf_parts

    return [(name, package, part) for name in models
            for package, part in zip(EMBEDDED_MODELS[name].packages, _gguf_parts(EMBEDDED_MODELS[name]))]


def stage(parts: list[tuple[str, str, Path]], chunk_bytes: int, stage_dir: Path = STAGE,
          wheels: bool = True) -> list[dict]:
    """Lay the ``parts`` ((model, package, file)) end to end and cut that stream into chunks under ``stage_dir``;
    write the manifest (and the wheels); return the calls that carry them: dicts of ``carry`` (paths from the
    repository's root) and ``command``."""
    if stage_dir.exists():
        shutil.rmtree(stage_dir)
    stage_dir.mkdir(parents=True)
    files, chunks, offset = [], [], 0
    pending = bytearray()  # the stream's bytes not yet written as a chunk
    for name, package, part in parts:
        digest = hashlib.sha256()
        with open(part, "rb") as source:
            while block := source.read(1 << 24):
                digest.update(block)
                pending += block
                while len(pending) >= chunk_bytes:
                    chunks.append(_write_chunk(stage_dir, len(chunks), pending[:chunk_bytes]))
                    del pending[:chunk_bytes]
        size = part.stat().st_size
        files.append({"model": name, "package": package, "file": part.name, "offset": offset, "bytes": size,
                      "sha256": digest.hexdigest()})
        offset += size
    if pending:
        chunks.append(_write_chunk(stage_dir, len(chunks), pending))
    if wheels:
        download_wheels(stage_dir / "wheels")
    (stage_dir / MANIFEST).write_text(json.dumps({"chunk_bytes": chunk_bytes, "chunks": chunks, "files": files},
                                                 indent=1))
    relative = stage_dir.relative_to(ROOT) if stage_dir.is_relative_to(ROOT) else stage_dir
    carried = [[str(relative / chunk)] for chunk in chunks]
    extra = sum(path.stat().st_size for path in stage_dir.rglob("*") if not path.name.startswith("chunk."))
    if not chunks or (stage_dir / chunks[-1]).stat().st_size + extra > chunk_bytes:  # else with the last chunk
        carried.append([])
    carried[-1] += [str(relative / MANIFEST)] + ([str(relative / "wheels")] if wheels else [])
    return [{"carry": group, "command": "true"} for group in carried[:-1]] + [
        {"carry": carried[-1], "command": "bash benchmarks/gpu_check.sh", "timeout_s": 540}]


def _write_chunk(stage_dir: Path, index: int, data: bytes | bytearray) -> str:
    name = f"chunk.{index:03d}"
    (stage_dir / name).write_bytes(data)
    return name


def download_wheels(folder: Path) -> None:
    """Wheels for Python 3.12 on x86-64 Linux of :data:`WHEELS`, at the versions installed here."""
    pins = [f"{name}=={importlib.metadata.version(name)}" for name in WHEELS]
    platforms = [arg for platform in PLATFORMS for arg in ("--platform", platform)]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--implementation", "cp", *platforms, "-d", str(folder), *pins],
                   check=True)


def unpack(stage_dir: Path, site: Path) -> list[str]:
    """Write each staged file whose chunks are all here to ``site/<package>/<file>`` (an empty ``__init__.py``
    beside it), checked against its sha256, and install the staged wheels into ``site``. Returns the models whose
    every file is there; says on stderr why any other is not."""
    manifest = json.loads((stage_dir / MANIFEST).read_text())
    size, chunks = manifest["chunk_bytes"], manifest["chunks"]
    complete: dict[str, bool] = {}
    for entry in manifest["files"]:
        first, last = entry["offset"] // size, (entry["offset"] + entry["bytes"] - 1) // size
        missing = [chunk for chunk in chunks[first : last + 1] if not (stage_dir / chunk).is_file()]
        ok = not missing
        if missing:
            print(f"{entry['model']}: not carried here: {', '.join(missing)}", file=sys.stderr)
        else:
            folder = site / entry["package"]
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "__init__.py").touch()
            digest, at, left = hashlib.sha256(), entry["offset"], entry["bytes"]
            with open(folder / entry["file"], "wb") as out:
                while left:
                    with open(stage_dir / chunks[at // size], "rb") as chunk:
                        chunk.seek(at % size)
                        block = chunk.read(min(left, size - at % size))
                    digest.update(block)
                    out.write(block)
                    at, left = at + len(block), left - len(block)
            ok = digest.hexdigest() == entry["sha256"]
            if not ok:
                print(f"{entry['package']}/{entry['file']}: sha256 {digest.hexdigest()}, expected {entry['sha256']}",
                      file=sys.stderr)
        complete[entry["model"]] = complete.get(entry["model"], True) and ok
    wheels = sorted((stage_dir / "wheels").glob("*.whl"))
    if wheels:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        "--upgrade", "--target", str(site), *map(str, wheels)], check=True)
    return [model for model, ok in complete.items() if ok]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="smollm2-135m,qwen2.5-0.5b", help="embedded models to stage")
    parser.add_argument("--chunk-mib", type=int, default=60, help="most MiB carried a call (the tool's limit: 64)")
    parser.add_argument("--no-wheels", action="store_true",
                        help="stage no wheels (a dry run of gpu_check.sh here, whose Python has the packages)")
    parser.add_argument("--unpack", type=Path, metavar="SITE",
                        help="on the GPU machine: join the staged files into SITE (a PYTHONPATH folder), print the "
                             "complete models, one per line")
    args = parser.parse_args()
    if args.unpack:
        print("\n".join(unpack(STAGE, args.unpack)))
        return
    calls = stage(model_files(args.models.split(",")), args.chunk_mib << 20, wheels=not args.no_wheels)
    for i, call in enumerate(calls, 1):
        print(json.dumps({"call": i, **call}))


if __name__ == "__main__":
    main()
