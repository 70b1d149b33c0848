"""gRPC face of the LLM service: proto <-> domain, one generation at a time.

The storyboard the writer returns (:class:`storyreel_llm.storyboard.Storyboard`,
a subclass of the shared :class:`storyreel.storyboard.Storyboard`) becomes the
contract's ``types.v1.Storyboard`` through the shared
:func:`storyreel.storyboard.storyboard_to_proto`, the one conversion the gateway
reads it back with too.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from concurrent.futures import ThreadPoolExecutor

import grpc

from storyreel.clip_count import clip_tokenizer
from storyreel.errors import FailedPrecondition, NotReady, Overloaded, StoryreelError
from storyreel.llm.v1 import llm_pb2, llm_pb2_grpc
from storyreel.serving import Service
from storyreel.storyboard import storyboard_to_proto
from storyreel_llm.backends import Backend, create_backend
from storyreel_llm.settings import LLMSettings
from storyreel_llm.writer import StoryboardWriter

log = logging.getLogger(__name__)


class GenerationSlot:
    """Runs blocking model work on one dedicated thread, so one generation runs at a time.

    The model loads on the same thread it generates on. Callers beyond
    ``max_waiting`` are turned away with :class:`Overloaded` instead of queueing
    for minutes.
    """

    def __init__(self, max_waiting: int) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="generate")
        self._max_waiting = max_waiting
        self._pending = 0  # running + waiting

    async def run(self, fn, /, *args, **kwargs):
        """Run ``fn(*args, **kwargs)`` on the generation thread and return its result."""
        if self._pending > self._max_waiting:
            raise Overloaded(f"{self._pending} storyboard requests are already queued; retry later")
        self._pending += 1
        try:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(
                self._executor, functools.partial(fn, *args, **kwargs)
            )
        finally:
            self._pending -= 1

    def shutdown(self) -> None:
        """Stop the thread once queued work is done."""
        self._executor.shutdown(wait=True, cancel_futures=True)


class LlmServicer(llm_pb2_grpc.LlmServiceServicer):
    """storyreel.llm.v1.LlmService: validates, then hands the request to the writer."""

    def __init__(self, writer: StoryboardWriter, slot: GenerationSlot) -> None:
        self._writer = writer
        self._slot = slot
        self.ready = False
        #: Why the model cannot serve, when loading it failed (None while loading or ready).
        self.unusable: str | None = None

    async def WriteStoryboard(
        self, request: llm_pb2.WriteStoryboardRequest, context: grpc.aio.ServicerContext
    ) -> llm_pb2.WriteStoryboardResponse:
        """Writes a storyboard with exactly ``scene_count`` scenes for ``prompt``.

        INVALID_ARGUMENT for a bad prompt, scene_count or style (checked before the
        model is touched); UNAVAILABLE while the model loads or when it fails;
        FAILED_PRECONDITION when the model (server) cannot be used at all, or refuses a
        request as a configuration error; RESOURCE_EXHAUSTED when too many requests wait.
        """
        self._writer.check_request(request.prompt, request.scene_count, request.style)
        if self.unusable is not None:
            raise FailedPrecondition(f"the story model cannot serve: {self.unusable}")
        if not self.ready:
            raise NotReady("the story model is still loading; retry shortly")
        storyboard = await self._slot.run(
            self._writer.write,
            request.prompt,
            request.scene_count,
            request.style,
            request.seed,
        )
        return llm_pb2.WriteStoryboardResponse(storyboard=storyboard_to_proto(storyboard))


class LlmService(Service):
    """The LLM service: the servicer plus the model backend it loads."""

    service_names = (llm_pb2.DESCRIPTOR.services_by_name["LlmService"].full_name,)

    def __init__(self, settings: LLMSettings, backend: Backend | None = None) -> None:
        self.settings = settings
        self.backend = backend if backend is not None else create_backend(settings)
        self._slot = GenerationSlot(settings.max_waiting_requests)
        self.writer = StoryboardWriter(self.backend, settings)
        self.servicer = LlmServicer(self.writer, self._slot)

    def add_to_server(self, server: grpc.aio.Server) -> None:
        """Register LlmService on ``server``."""
        llm_pb2_grpc.add_LlmServiceServicer_to_server(self.servicer, server)

    async def load(self) -> None:
        """Load the model (or wait for the model server) on the generation thread.

        The CLIP tokenizer is built first, so a missing vocabulary fails the start,
        not the first request. Requests are served after this.
        """
        log.info("loading model", extra={"backend": self.backend.name})
        await asyncio.to_thread(clip_tokenizer)
        try:
            await self._slot.run(self.backend.load)
        except StoryreelError as exc:
            # Health stays NOT_SERVING; requests are told why instead of "still loading".
            self.servicer.unusable = exc.message
            log.error("the model cannot serve", extra={"reason": exc.message})
            raise
        self.servicer.ready = True

    async def close(self) -> None:
        """Stop serving, end any wait for the model server, finish queued work, release."""
        self.servicer.ready = False
        # A load still polling the model server (or a request waiting to retry) ends now
        # instead of holding the generation thread until its own timeout.
        self.backend.interrupt()
        await asyncio.to_thread(self._slot.shutdown)
        self.backend.close()
