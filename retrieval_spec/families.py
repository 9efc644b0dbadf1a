"""Which models the engine can verify exactly, and the attention layout the verifier's masks must follow.

Tree verification hands the model a 4-D attention mask and one position id per node. A transformers model
honours both only if every layer is softmax attention over a key/value cache (full, or over a sliding window,
which the mask then carries), its attention kernel accepts an arbitrary mask, and, where full and sliding layers
are mixed, it takes one mask per layer type (a probe of three two-token forwards finds out). Anything else —
recurrent or linear-attention layers, chunked attention, encoder-decoders, flash-attention kernels — is refused
here, by name, before a token is decoded.

The families of ``VERIFIED`` are proven token-for-token equal to ``generate()`` by ``tests/test_model_zoo.py``;
any other decoder that passes these checks is verified once at start-up against plain forwards
(:meth:`retrieval_spec.verify.Verifier.self_check`) and refused if a logit differs.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

from .errors import UnsupportedModelError

ATTENTION_LAYERS = ("full_attention", "sliding_attention")
MASK_KERNELS = ("sdpa", "eager")  # kernels that apply an arbitrary additive 4-D mask
# Model types proven equal to generate() by tests/test_model_zoo.py (greedy, fp32, single and batched).
VERIFIED = frozenset({
    "llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "gpt2", "gpt_neox", "opt",
})
# Learned absolute position embeddings: a position past the table is an error, not a weaker prediction.
LEARNED_POSITIONS = frozenset({"gpt2", "opt", "gpt_bigcode", "biogpt", "xglm"})
# Config fields that only recurrent / state-space hybrids have (Mamba, Jamba, RecurrentGemma, Bamba, Zamba...).
RECURRENT_FIELDS = ("mamba_", "ssm_", "block_types", "layers_block_type", "attn_layer_period", "attn_layer_indices")


@dataclass(frozen=True)
class AttentionLayout:
    """What the verifier needs to build masks and place nodes for one model.

    Attributes:
        model_type: ``config.model_type`` of the decoder, for messages.
        sliding_window: keys a sliding layer sees, itself included (``q - k < sliding_window``); None when no
            layer slides.
        per_layer_type: the model mixes full and sliding layers and takes a dict of masks keyed by layer type.
        max_positions: the largest position id plus one the model can embed, when that is a hard limit (learned
            position tables); None for rotary models, which extrapolate like plain decoding does.
        context_limit: the context the model was trained for (``max_position_embeddings`` or ``n_positions``),
            used to refuse prompts that do not fit; None when the config names none.
        verified: the model type is in :data:`VERIFIED`.
    """

    model_type: str
    sliding_window: int | None
    per_layer_type: bool
    max_positions: int | None
    context_limit: int | None
    verified: bool


def attention_layout(model: Any) -> AttentionLayout:
    """The layout of a loaded transformers causal LM, or :class:`UnsupportedModelError` naming what is wrong."""
    config = model.config
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    model_type = str(getattr(text, "model_type", "") or type(model).__name__)
    name = f"{type(model).__name__} (model_type {model_type!r})"
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedModelError(f"{name} is an encoder-decoder; retrieval-spec decodes causal LMs only")
    parameters = inspect.signature(model.forward).parameters
    missing = [name for name in ("past_key_values", "position_ids", "attention_mask") if name not in parameters]
    if missing:
        raise UnsupportedModelError(
            f"{name} does not take {', '.join(missing)}; tree verification places every node with its own "
            "position id and attention mask over a key/value cache (recurrent and ALiBi models cannot)"
        )
    recurrent = sorted(key for key in vars(text) if key.startswith(RECURRENT_FIELDS))
    if recurrent:
        raise UnsupportedModelError(
            f"{name} has recurrent (state-space) layers ({', '.join(recurrent[:3])}...); a token tree cannot be "
            "verified through a recurrent state"
        )
    kernel = getattr(config, "_attn_implementation", None) or "eager"
    if kernel not in MASK_KERNELS:
        raise UnsupportedModelError(
            f"{name} runs attention with {kernel!r}, which cannot apply a tree mask; load it with "
            f"attn_implementation='sdpa' (or 'eager')"
        )
    layers = int(getattr(text, "num_hidden_layers", 0) or getattr(text, "n_layer", 0) or 0)
    window = getattr(text, "sliding_window", None)
    layer_types = list(getattr(text, "layer_types", None) or [])
    if not layer_types:
        layer_types = ["sliding_attention" if window else "full_attention"] * max(layers, 1)
    unknown = sorted(set(layer_types) - set(ATTENTION_LAYERS))
    if unknown:
        raise UnsupportedModelError(
            f"{name} has {', '.join(unknown)} layers; tree verification needs softmax attention over a key/value "
            "cache in every layer (recurrent, linear and chunked attention cannot take a token tree)"
        )
    sliding = "sliding_attention" in layer_types
    if sliding and not window:
        raise UnsupportedModelError(f"{name} has sliding-attention layers but no sliding_window in its config")
    mixed = len(set(layer_types)) > 1
    if mixed and not _takes_masks_per_layer_type(model):
        raise UnsupportedModelError(
            f"{name} mixes full and sliding attention layers but takes a single attention mask; its layers "
            "would see the same window"
        )
    limit = getattr(text, "max_position_embeddings", None) or getattr(text, "n_positions", None)
    return AttentionLayout(
        model_type=model_type,
        sliding_window=int(window) if sliding else None,
        per_layer_type=mixed,
        max_positions=int(limit) if limit and model_type in LEARNED_POSITIONS else None,
        context_limit=int(limit) if limit else None,
        verified=model_type in VERIFIED,
    )


def _takes_masks_per_layer_type(model: Any) -> bool:
    """Whether the decoder applies ``attention_mask={"full_attention": ..., "sliding_attention": ...}`` per layer type.

    A behavioural probe rather than a reading of its source: two random hidden states go through the decoder
    three times, with the 4-D additive masks the verifier builds — causal in both layer types, then hiding the
    first state from the second in the full layers only, then in the sliding layers only. A decoder that takes a
    mask per layer type answers the two hiding runs differently from the causal one; a decoder that takes a
    single mask refuses the dict or applies one of its masks to every layer, and one of the runs comes out equal.
    """
    import torch

    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    parameter = next(model.parameters())
    dtype, device = parameter.dtype, parameter.device
    width = model.get_input_embeddings().embedding_dim
    states = torch.randn(1, 2, width, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    masked = torch.finfo(dtype).min
    causal = torch.tensor([[0.0, masked], [0.0, 0.0]], dtype=dtype, device=device)[None, None]  # (1, 1, 2, 2)
    alone = torch.tensor([[0.0, masked], [masked, 0.0]], dtype=dtype, device=device)[None, None]
    positions = torch.arange(2, device=device)[None]

    def second_state(full: torch.Tensor, sliding: torch.Tensor) -> torch.Tensor:
        out = decoder(inputs_embeds=states, attention_mask={"full_attention": full, "sliding_attention": sliding},
                      position_ids=positions, use_cache=False)
        return out.last_hidden_state[0, 1]

    try:
        with torch.inference_mode():
            seen = second_state(causal, causal)
            unseen_in_full, unseen_in_sliding = second_state(alone, causal), second_state(causal, alone)
    except (TypeError, AttributeError, KeyError, IndexError, ValueError, RuntimeError):  # the dict was refused
        return False
    return not torch.equal(seen, unseen_in_full) and not torch.equal(seen, unseen_in_sliding)
