"""Faces of the torch-free core inside other serving engines (``integrations.vllm``: a vLLM proposer).

Nothing here is imported by the rest of the package; each module imports its engine only when the engine calls it.
"""
