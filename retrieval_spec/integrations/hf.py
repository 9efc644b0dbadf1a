"""Inside the Hugging Face code you already run: ``model.generate()`` and ``pipeline("text-generation")`` run here.

    from retrieval_spec import hf

    hf.enable(model, tokenizer)                      # replaces generate on this model instance
    model.generate(**inputs, max_new_tokens=128)     # greedy: the tokens transformers' generate gives, token for token
    pipeline("text-generation", model=model, tokenizer=tokenizer)(messages, do_sample=False)
    hf.disable(model)                                # transformers' own generate again

or per call, through transformers' ``custom_generate`` door, with no switch:

    model.generate(**inputs, custom_generate=hf.CUSTOM_GENERATE, trust_remote_code=True)

A call is read as ``generate()`` reads it: the ``generation_config`` argument, or the model's, updated by the
keyword arguments, over transformers' global defaults (``do_sample=False`` is greedy whatever ``temperature``
says; sampling keeps ``top_k=50`` unless told otherwise). An option the engine cannot honour exactly raises
:class:`~retrieval_spec.errors.UnsupportedOptionError` naming it, or, after ``enable(..., fallback=True)``, sends
that call to transformers' own ``generate``.
"""

from __future__ import annotations

import contextlib
import threading
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from transformers import GenerationConfig as HFGenerationConfig
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.generation.utils import GenerateDecoderOnlyOutput

from ..config import GenerationConfig
from ..datastore.manifest import tokenizer_fingerprint
from ..datastore.reader import Datastore
from ..drafters.registry import load_state, make_drafters, save_state
from ..errors import InputError, UnsupportedOptionError
from ..files import check_output_directory
from ..generate import BatchResult, SpeculativeGenerator
from ..sizing import CostCurve

CUSTOM_GENERATE = str(Path(__file__).resolve().with_name("hf_generate"))
"""The folder of ``custom_generate/generate.py``: ``model.generate(custom_generate=..., trust_remote_code=True)``."""

_ENGINE = "_retrieval_spec_engine"  # model attribute: the engine enable() attached
_DEFAULT_ENGINE = "_retrieval_spec_default_engine"  # model attribute: the engine custom_generate built on first use

# GenerationConfig fields a call may set freely.
_HONOURED = frozenset({
    "max_length", "max_new_tokens", "do_sample", "temperature", "top_k", "top_p", "min_p", "repetition_penalty",
    "eos_token_id", "pad_token_id", "bos_token_id", "stop_strings", "num_return_sequences", "return_dict_in_generate",
})
_INERT = frozenset({
    # metadata, and how keys and values are kept or compiled: the tokens do not depend on them
    "transformers_version", "decoder_start_token_id", "use_cache", "cache_implementation", "cache_config",
    "max_cache_len", "compile_config", "disable_compile", "prefill_chunk_size", "continuous_batching_config",
    "low_memory",
    # a log-softmax after the processors: the same argmax, the same distribution (only scores would show it)
    "renormalize_logits",
    # read by encoder-decoder models only
    "encoder_repetition_penalty", "encoder_no_repeat_ngram_size",
    # read only by assisted generation, which is refused on its own trigger (assistant_model, prompt_lookup_num_tokens,
    # assistant_early_exit, use_mtp, is_assistant)
    "num_assistant_tokens", "num_assistant_tokens_schedule", "assistant_confidence_threshold", "assistant_lookbehind",
    "target_lookbehind", "max_matching_ngram_size", "assistant_ensemble_weight",
})
_SAMPLING_ONLY = ("typical_p", "epsilon_cutoff", "eta_cutoff", "top_h")  # warpers: applied when do_sample only
_BEAMS_ONLY = ("early_stopping", "length_penalty", "num_beam_groups", "diversity_penalty")
_EXTRA_OUTPUTS = ("output_scores", "output_logits", "output_attentions", "output_hidden_states")
# When a field set away from its default still leaves the tokens alone: (config, prompt length) -> inactive
_INACTIVE_WHEN: dict[str, Callable[[HFGenerationConfig, int], bool]] = {
    **{name: lambda c, n: not c.do_sample for name in _SAMPLING_ONLY},
    **{name: lambda c, n: (c.num_beams or 1) == 1 for name in _BEAMS_ONLY},
    **{name: lambda c, n: not c.return_dict_in_generate for name in _EXTRA_OUTPUTS},  # ignored, as generate() does
    "penalty_alpha": lambda c, n: c.do_sample or not c.penalty_alpha > 0 or not (c.top_k or 0) > 1,  # contrastive
    "guidance_scale": lambda c, n: c.guidance_scale == 1,
    # EOS is banned only while the sequence is shorter than min_length (prompt included), or min_new_tokens new
    "min_length": lambda c, n: c.min_length <= n or c.eos_token_id is None,
    "min_new_tokens": lambda c, n: c.min_new_tokens <= 0 or c.eos_token_id is None,
}
# generate()'s own parameters besides the GenerationConfig fields; those not None (or empty) are refused
_REFUSED_ARGUMENTS = ("logits_processor", "stopping_criteria", "prefix_allowed_tokens_fn", "assistant_model",
                      "negative_prompt_ids", "negative_prompt_attention_mask", "synced_gpus")


class Engine:
    """The speculative generator behind one model's ``generate``, with the drafters it owns and what it learned.

    Attributes:
        generator: the decoding loop (its drafters carry what they learned from call to call).
        drafters: the drafters of ``method`` (saved to ``state_dir`` by :func:`disable`).
        transformers_generate: the ``generate`` that :func:`disable` restores (and ``fallback=True`` calls).
        last_result: the :class:`~retrieval_spec.generate.BatchResult` of the latest call (its stats).
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase | None,
        method: str = "auto",
        index: str | Path | None = None,
        state_dir: str | Path | None = None,
        fallback: bool = False,
        cost_curve: CostCurve | None = None,
    ) -> None:
        self.tokenizer, self.method, self.fallback = tokenizer, method, fallback
        self.index = None if index is None else Path(index)
        self.state_dir = None if state_dir is None else Path(state_dir)
        self._tokenizer_sha256 = None
        if (self.index is not None or self.state_dir is not None) and tokenizer is None:
            raise InputError("an index or a state directory needs the model's tokenizer")
        if self.state_dir is not None:  # saved to on disable(): refused now, not then
            check_output_directory(self.state_dir, "state_dir")
        fingerprint = tokenizer_fingerprint(tokenizer) if tokenizer is not None and (index or state_dir) else None
        datastore = None if self.index is None else Datastore.open(self.index, fingerprint)
        vocab_size = int(model.config.get_text_config(decoder=True).vocab_size)
        self.drafters = make_drafters(method, vocab_size, datastore)
        if self.state_dir is not None:
            self._tokenizer_sha256 = fingerprint.sha256
            load_state(self.drafters, self.state_dir, self._tokenizer_sha256, vocab_size)
        self.generator = SpeculativeGenerator(model, tokenizer or _NoTokenizer(), self.drafters, cost_curve=cost_curve)
        self._replaced = model.__dict__.get("generate")  # an instance generate (a custom_generate folder's) or None
        self.transformers_generate: Callable = self._replaced or type(model).generate.__get__(model, type(model))
        self.last_result: BatchResult | None = None
        self._lock = threading.Lock()  # one call at a time: the rows' cache lives in the generator
        self._settings = _settings(tokenizer, method, index, state_dir, fallback, cost_curve)

    def generate(self, model: PreTrainedModel, arguments: dict[str, Any]) -> torch.Tensor | GenerateDecoderOnlyOutput:
        """Run one ``generate()`` call, given as its keyword arguments (``inputs``, ``streamer``, ``max_new_tokens``).

        The streamer, if any, gets the prompt, each step's tokens and ``end()``, also when decoding fails.

        Raises:
            UnsupportedOptionError: an option the engine cannot honour exactly (unless ``fallback``).
            InputError: a call that transformers would refuse too, or a streamer with several rows.
        """
        streamer = arguments.get("streamer")
        try:
            call = _translate(model, arguments, self.tokenizer, self.generator.verifier.layout.context_limit)
        except UnsupportedOptionError:
            if self.fallback:
                rest = {k: v for k, v in arguments.items() if not (k == "custom_generate" and _is_ours(v))}
                return self.transformers_generate(**rest)
            _end(streamer)
            raise
        except BaseException:
            _end(streamer)
            raise
        try:
            if streamer is not None:
                streamer.put(call.input_ids.cpu())
            on_tokens = None if streamer is None else lambda _, tokens: streamer.put(torch.as_tensor(tokens).long())
            with self._lock, self._stop_tokenizer(call.stop_tokenizer):
                result = self.generator.generate_batch(call.prompts, call.config, on_tokens=on_tokens)
        finally:
            _end(streamer)
        self.last_result = result
        sequences = _sequences(call, result)
        return GenerateDecoderOnlyOutput(sequences=sequences) if call.return_dict else sequences

    def save_state(self) -> list[str]:
        """Save what the drafters learned into ``state_dir`` (atomically, file by file); the files written."""
        if self.state_dir is None:
            return []
        return save_state(self.drafters, self.state_dir, self._tokenizer_sha256)

    @contextlib.contextmanager
    def _stop_tokenizer(self, tokenizer: PreTrainedTokenizerBase | None) -> Iterator[None]:
        """Stop strings are read with the call's ``tokenizer=`` where it gives one (the loop reads its own)."""
        if tokenizer is None or tokenizer is self.generator.tokenizer:
            yield
            return
        own, self.generator.tokenizer = self.generator.tokenizer, tokenizer
        try:
            yield
        finally:
            self.generator.tokenizer = own


def enable(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    method: str = "auto",
    index: str | Path | None = None,
    state_dir: str | Path | None = None,
    *,
    fallback: bool = False,
    cost_curve: CostCurve | None = None,
) -> Engine:
    """Make ``model.generate`` (and so ``pipeline("text-generation")``) decode with this engine.

    Enabling again with the same arguments keeps the engine (and what it learned); with others, the model is
    disabled first (saving state) and enabled anew.

    Args:
        model: a causal LM of a supported family (``retrieval_spec.families``).
        tokenizer: its tokenizer (stop strings, the index's and the state's fingerprint).
        method: drafting method, a key of ``retrieval_spec.drafters.registry.METHODS``.
        index: a corpus datastore directory (``retrieval-spec build-index``) for ``rest`` and ``auto``.
        state_dir: load what the drafters learned from here now, save it back on :func:`disable`.
        fallback: send calls with options the engine cannot honour to transformers' own ``generate`` instead of
            raising :class:`UnsupportedOptionError`.
        cost_curve: the cost of verifying k tokens; measured once per machine and cached when omitted.

    Raises:
        InputError: unknown method, or ``rest`` without an index.
        DatastoreFormatError, TokenizerMismatchError: an index or a state file that cannot be used.
    """
    current: Engine | None = model.__dict__.get(_ENGINE)
    if current is not None:
        if current._settings == _settings(tokenizer, method, index, state_dir, fallback, cost_curve):
            return current
        disable(model)
    engine = Engine(model, tokenizer, method, index, state_dir, fallback, cost_curve)
    setattr(model, _ENGINE, engine)
    model.generate = types.MethodType(_speculative_generate, model)
    return engine


def disable(model: PreTrainedModel) -> list[str]:
    """Give ``model`` back transformers' own ``generate``; with ``state_dir``, save what the drafters learned.

    Leaves no attribute of ours on the model: the engine :func:`enable` attached and the one ``custom_generate``
    built (it keeps no state) both go.

    Returns:
        the state files written (none without ``state_dir``, or when the model was not enabled).
    """
    model.__dict__.pop(_DEFAULT_ENGINE, None)
    engine: Engine | None = model.__dict__.pop(_ENGINE, None)
    if engine is None:
        return []
    if engine._replaced is not None:
        model.generate = engine._replaced
    else:
        model.__dict__.pop("generate", None)
    return engine.save_state()


def _settings(tokenizer, method, index, state_dir, fallback, cost_curve) -> tuple:
    """What makes two :func:`enable` calls the same engine (objects by identity, paths as paths)."""
    return (id(tokenizer), method, None if index is None else Path(index),
            None if state_dir is None else Path(state_dir), fallback, id(cost_curve))


def custom_generate(model: PreTrainedModel, **arguments: Any) -> torch.LongTensor | GenerateDecoderOnlyOutput:
    """What ``custom_generate/generate.py`` runs: the engine :func:`enable` attached, else a default ``auto``
    engine built on first use and kept on the model."""
    engine = model.__dict__.get(_ENGINE) or model.__dict__.get(_DEFAULT_ENGINE)
    if engine is None:
        engine = Engine(model, arguments.get("tokenizer"), "auto")
        setattr(model, _DEFAULT_ENGINE, engine)
    return engine.generate(model, arguments)


def _speculative_generate(
    self: PreTrainedModel,
    inputs: torch.Tensor | None = None,
    generation_config: HFGenerationConfig | None = None,
    logits_processor=None,
    stopping_criteria=None,
    prefix_allowed_tokens_fn=None,
    synced_gpus: bool | None = None,
    assistant_model=None,
    streamer=None,
    negative_prompt_ids=None,
    negative_prompt_attention_mask=None,
    custom_generate: str | Callable | None = None,
    **kwargs: Any,
) -> torch.LongTensor | GenerateDecoderOnlyOutput:
    """``generate`` with transformers' signature, run by the engine :func:`enable` attached (``retrieval_spec.hf``)."""
    arguments = dict(
        inputs=inputs, generation_config=generation_config, logits_processor=logits_processor,
        stopping_criteria=stopping_criteria, prefix_allowed_tokens_fn=prefix_allowed_tokens_fn,
        synced_gpus=synced_gpus, assistant_model=assistant_model, streamer=streamer,
        negative_prompt_ids=negative_prompt_ids, negative_prompt_attention_mask=negative_prompt_attention_mask,
        custom_generate=custom_generate, **kwargs,
    )
    return self.__dict__[_ENGINE].generate(self, arguments)


@dataclass(frozen=True)
class _Call:
    """One ``generate()`` call, translated.

    Attributes:
        input_ids: (rows, L) the prompt rows as ``generate()`` returns them: padding kept, each prompt repeated
            ``num_return_sequences`` times.
        prompts: every row's (p,) tokens without its padding.
        config: what the loop runs.
        pad_token_id: fills the rows that end early (transformers' fallback: the first EOS).
        return_dict: return a ``GenerateDecoderOnlyOutput`` rather than the tensor.
        streamer: gets the prompt, the tokens and ``end()``.
        stop_tokenizer: the call's ``tokenizer=`` (stop strings), or None for the engine's.
    """

    input_ids: torch.Tensor
    prompts: list[np.ndarray]
    config: GenerationConfig
    pad_token_id: int | None
    return_dict: bool
    streamer: Any
    stop_tokenizer: PreTrainedTokenizerBase | None


def _translate(model: PreTrainedModel, arguments: dict[str, Any], tokenizer: PreTrainedTokenizerBase | None,
               context_limit: int | None) -> _Call:
    """Read a ``generate()`` call as transformers does; refuse what the engine cannot honour exactly.

    ``context_limit`` is the model's (``families.attention_layout(model).context_limit``): a call that sets no
    length gets ``generate()``'s 20 new tokens, cut to it."""
    args = {k: v for k, v in arguments.items() if k != "trust_remote_code"}
    refused = [name for name in _REFUSED_ARGUMENTS if _given(args.pop(name, None))]
    custom = args.pop("custom_generate", None)
    if custom is not None and not _is_ours(custom):
        refused.append("custom_generate")
    streamer = args.pop("streamer", None)
    call_tokenizer = args.pop("tokenizer", None)
    input_ids = args.pop("inputs", None)
    if input_ids is None:
        input_ids = args.pop("input_ids", None)
    attention_mask = args.pop("attention_mask", None)
    generation_config = args.pop("generation_config", None)
    has_default_max_length = (args.get("max_length") is None
                              and (generation_config is None or generation_config.max_length is None)
                              and model.generation_config.max_length is None)
    config, model_kwargs = model._prepare_generation_config(generation_config, **args)
    refused += [name for name, value in model_kwargs.items() if value is not None and name not in refused
                and not name.startswith("output_")]  # output_* are named by the config check below

    if input_ids is None:  # as generate(): start from BOS
        if config.bos_token_id is None:
            raise InputError("generate() needs input_ids (or a bos_token_id to start from)")
        input_ids = torch.full((1, 1), int(config.bos_token_id), dtype=torch.long)
    if input_ids.ndim != 2:
        raise InputError(f"input_ids must be 2-D (batch, length), got shape {tuple(input_ids.shape)}")
    length = input_ids.shape[1]
    refused += _refused_fields(config, length)
    eos = () if config.eos_token_id is None else tuple(torch.as_tensor(config.eos_token_id).flatten().tolist())
    mask = _attention_mask(input_ids, attention_mask, config.pad_token_id, eos)
    if not all(np.all(np.diff(row) >= 0) for row in mask.astype(np.int8)):
        refused.append("attention_mask (right padding or gaps; decoder-only models take left padding)")
    stops = config.stop_strings
    stops = () if stops is None else (stops,) if isinstance(stops, str) else tuple(stops)
    copies = config.num_return_sequences or 1
    rows = input_ids.shape[0] * copies
    if stops and rows > 1 and not eos:
        refused.append("stop_strings (several rows and no eos_token_id: transformers keeps decoding finished rows)")
    if refused:
        raise UnsupportedOptionError(
            f"generate() option(s) retrieval-spec cannot honour exactly: {', '.join(refused)}. "
            "Call retrieval_spec.hf.disable(model) to use transformers' generate, or enable(..., fallback=True) to "
            "send such calls there", options=tuple(name.split("=")[0].split(" ")[0] for name in refused))

    if streamer is not None and rows > 1:
        raise InputError(f"a streamer takes one row, as in transformers; this call decodes {rows}")
    stop_tokenizer = call_tokenizer if call_tokenizer is not None else tokenizer
    if stops and stop_tokenizer is None:
        raise InputError("stop_strings need the model's tokenizer: pass generate(..., tokenizer=tokenizer)")
    if config.max_new_tokens is not None:
        max_new_tokens = config.max_new_tokens
    elif has_default_max_length:  # generate(): 20 new tokens, within the model's positions
        max_new_tokens = min(config.max_length + length, context_limit or config.max_length + length) - length
    else:
        max_new_tokens = config.max_length - length
    if max_new_tokens < 1:
        raise InputError(f"input_ids has {length} tokens but max_length is {config.max_length}: nothing to generate; "
                         "set max_new_tokens")
    sampling = {}
    if config.do_sample:
        temperature = 1.0 if config.temperature is None else float(config.temperature)
        if not temperature > 0:
            raise InputError(f"do_sample=True needs temperature > 0, got {temperature}")
        # From torch's global generator, so that torch.manual_seed / transformers.set_seed reproduce a call.
        seed = int(torch.randint(0, 2**62, (1,)).item())
        sampling = dict(temperature=temperature, top_k=config.top_k or 0,
                        top_p=1.0 if config.top_p is None else config.top_p, min_p=config.min_p or 0.0, seed=seed)
    loop_config = GenerationConfig(max_new_tokens=max_new_tokens, stop_strings=stops, eos_token_ids=eos,
                                   repetition_penalty=config.repetition_penalty or 1.0, **sampling)
    input_ids = input_ids.long().repeat_interleave(copies, dim=0)
    mask = mask.repeat(copies, axis=0)
    ids = input_ids.cpu().numpy()
    prompts = [row[keep].astype(np.int32) for row, keep in zip(ids, mask)]
    pad = config.pad_token_id if config.pad_token_id is not None else (eos[0] if eos else None)
    return _Call(input_ids=input_ids, prompts=prompts, config=loop_config, pad_token_id=pad,
                 return_dict=bool(config.return_dict_in_generate), streamer=streamer,
                 stop_tokenizer=call_tokenizer)


def _refused_fields(config: HFGenerationConfig, input_length: int) -> list[str]:
    """``name=value`` of every field of ``config`` that changes decoding away from defaults the engine cannot
    honour: the comparison runs over all of GenerationConfig's fields, so a field added by a later transformers
    release is refused until it is classified here."""
    defaults = HFGenerationConfig._get_default_generation_params()
    refused = []
    for name in vars(HFGenerationConfig()):
        if name.startswith("_") or name in _HONOURED or name in _INERT:
            continue
        value, default = getattr(config, name, None), defaults.get(name)
        if value is None or _equal(value, default) or (value is False and default is None):
            continue
        inactive = _INACTIVE_WHEN.get(name)
        if inactive is not None and inactive(config, input_length):
            continue
        refused.append(f"{name}={value!r}")
    return refused


def _attention_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, pad: int | None,
                    eos: tuple[int, ...]) -> np.ndarray:
    """(rows, L) bool: the given mask, else transformers' inference (pad tokens, when pad is not an EOS)."""
    if attention_mask is not None:
        return attention_mask.cpu().numpy().astype(bool)
    ids = input_ids.cpu().numpy()
    if pad is not None and pad not in eos and (ids == pad).any():
        return ids != pad
    return np.ones(ids.shape, dtype=bool)


def _sequences(call: _Call, result: BatchResult) -> torch.LongTensor:
    """Prompt rows then new tokens, rows that ended early padded, as wide as the longest row (as ``generate``)."""
    width = max(len(row.tokens) for row in result.rows)
    rows, length = call.input_ids.shape
    out = torch.full((rows, length + width), 0 if call.pad_token_id is None else call.pad_token_id, dtype=torch.long)
    out[:, :length] = call.input_ids.cpu()
    for b, row in enumerate(result.rows):
        out[b, length : length + len(row.tokens)] = torch.as_tensor(row.tokens, dtype=torch.long)
    return out.to(call.input_ids.device)


def _given(value: Any) -> bool:
    """Whether a generate() argument asks for something: not None, not an empty processor or criteria list."""
    if value is None or value is False:
        return False
    try:
        return len(value) > 0
    except TypeError:
        return True


def _equal(value: Any, default: Any) -> bool:
    try:
        return bool(value == default)
    except (RuntimeError, ValueError, TypeError):  # tensors and the like: not a default
        return False


def _is_ours(custom: Any) -> bool:
    return isinstance(custom, (str, Path)) and Path(custom).resolve() == Path(CUSTOM_GENERATE)


def _end(streamer: Any) -> None:
    if streamer is not None:
        streamer.end()


class _NoTokenizer:
    """Stands in when a ``custom_generate`` call brings no tokenizer: prompts and outputs are token ids."""

    def decode(self, ids, **_) -> str:
        return ""
