"""Every face of the engine inside another one: ``integrations.hf`` (transformers' ``generate`` and ``pipeline``,
also as ``from retrieval_spec import hf``) and ``integrations.vllm`` (a vLLM speculative proposer).

Nothing else in the package imports them. ``vllm`` imports neither torch nor vllm (vLLM calls it inside its own
process); ``hf`` imports transformers, the library it plugs into.
"""
