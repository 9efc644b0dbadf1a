"""retrieval-spec: lossless speculative decoding that drafts from text that already exists.

``SpeculativeGenerator`` (and everything that imports torch) is loaded lazily, so that the pure-numpy parts
(datastore, builders, drafters, tree) can be imported without torch. ``from retrieval_spec import hf`` is the
Hugging Face switch, :mod:`retrieval_spec.integrations.hf`.
"""

__version__ = "0.1.0"

_LAZY = {
    "BatchResult": "generate",
    "SpeculativeGenerator": "generate",
    "GenerationConfig": "config",
    "GenerationResult": "generate",
    "load_model": "models",
    "make_drafters": "drafters.registry",
}
_MODULES = {"hf": "integrations.hf"}  # faces into other engines, by their short names


def __getattr__(name: str):
    import importlib

    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    if name in _MODULES:
        return importlib.import_module(f".{_MODULES[name]}", __name__)
    raise AttributeError(f"module 'retrieval_spec' has no attribute {name!r}")


__all__ = sorted([*_LAZY, *_MODULES])
