"""retrieval-spec: lossless speculative decoding that drafts from text that already exists.

``SpeculativeGenerator`` (and everything that imports torch) is loaded lazily, so that the pure-numpy parts
(datastore, builders, drafters, tree) can be imported without torch.
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


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'retrieval_spec' has no attribute {name!r}")


__all__ = sorted(_LAZY)
