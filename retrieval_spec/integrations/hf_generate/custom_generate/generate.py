"""retrieval-spec's entry point for transformers' ``custom_generate`` (see ``retrieval_spec.integrations.hf``):

    model.generate(**inputs, custom_generate=retrieval_spec.hf.CUSTOM_GENERATE, trust_remote_code=True)

transformers copies this file into its module cache and calls ``generate(model=model, **generate_arguments)``
with every argument of the call (streamer and tokenizer included); the installed package does the work.
"""

from retrieval_spec.integrations.hf import custom_generate


def generate(model, **kwargs):
    return custom_generate(model, **kwargs)
