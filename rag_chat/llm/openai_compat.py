"""Any OpenAI-compatible chat server (vLLM, llama.cpp's server, Ollama, OpenAI itself).

The stream is read by the task that iterates the answer; cancelling closes the HTTP response,
and servers stop generating when their client disconnects. The official SDK sends
the request (through its aiohttp transport); the event stream it answers with is read from the
aiohttp response and parsed here (orjson, plain dicts).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from typing import Any

import aiohttp
import httpx
import openai

from rag_chat.errors import LLMError, LLMTimeout, LLMUnavailable
from rag_chat.llm.base import FinishReason, Generation, Message

try:  # installed with chromadb; the stdlib parses the same, several times slower
    import orjson
except ImportError:  # pragma: no cover
    orjson = None  # type: ignore[assignment]

# what reading the response raises: the SDK reads with httpx2 (openai 3.x) or httpx (1.x, 2.x)
_TIMEOUTS: tuple[type[BaseException], ...] = (httpx.TimeoutException,)
_TRANSPORT: tuple[type[BaseException], ...] = (httpx.TransportError,)
try:
    import httpx2

    _TIMEOUTS += (httpx2.TimeoutException,)
    _TRANSPORT += (httpx2.TransportError,)
except ImportError:  # pragma: no cover
    pass
# … and what reading the aiohttp response itself raises (_lines)
_READ_TIMEOUTS: tuple[type[BaseException], ...] = (*_TIMEOUTS, aiohttp.ServerTimeoutError)
_READ_ERRORS: tuple[type[BaseException], ...] = (*_TRANSPORT, aiohttp.ClientError)

DEFAULT_CONTEXT_WINDOW = 8192
CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 60.0
# the longest wait for the next bytes of an answer (the headers, then each chunk), unless the
# constructor is given one
CHECK_TIMEOUT_S = 5.0
MAX_RETRIES = 2
# how long cancel() waits for the request's abort or the connection's close
CANCEL_WAIT_S = 5.0


class OpenAICompatLLM:
    def __init__(
        self,
        base_url: str,
        api_key: str = "not-needed",
        model: str | None = None,
        *,
        context_window: int = DEFAULT_CONTEXT_WINDOW,
        max_retries: int = MAX_RETRIES,
        read_timeout: float | None = None,
    ) -> None:
        self.base_url = base_url
        self.context_window = context_window
        self._model = model
        # RAG_LLM_READ_TIMEOUT_SECONDS (settings) through build_llm
        self.read_timeout = read_timeout if read_timeout is not None else READ_TIMEOUT_S
        self._client = openai.AsyncOpenAI(
            base_url=base_url,
            api_key=api_key,
            timeout=openai.Timeout(self.read_timeout, connect=CONNECT_TIMEOUT_S),
            max_retries=max_retries,
            # the SDK's aiohttp transport (openai[aiohttp]): reading a streamed answer through
            # httpx's own transport (h11, a cancel scope per read) was the server's largest
            # cost with hundreds of answers streaming (benchmarks/concurrency.py, py-spy)
            http_client=openai.DefaultAioHttpClient(),
        )
        # servers that reject stream_options get one retry without it, then never again
        self._usage_option = True
        self._idle = _IdleStreams(self.read_timeout)

    @property
    def model_name(self) -> str:
        # the configured model, else the server's first model once check() or a stream has
        # resolved it
        return self._model or "unresolved"

    def count_tokens(self, text: str) -> int:
        return max(1, len(text) // 4)

    def stream(
        self,
        messages: list[Message],
        *,
        max_tokens: int,
        temperature: float = 0.2,
        stop: list[str] | None = None,
    ) -> Generation:
        return _OpenAIGeneration(
            self, [dict(m) for m in messages], max_tokens, temperature, list(stop or [])
        )

    async def check(self) -> None:
        client = self._client.with_options(timeout=CHECK_TIMEOUT_S, max_retries=0)
        try:
            page = await client.models.list()
        except openai.OpenAIError as exc:
            # a readiness probe has one answer for "not usable", whatever the cause
            err = self._error(exc)
            raise (err if isinstance(err, LLMUnavailable) else LLMUnavailable(str(err))) from exc
        if self._model is None:
            self._model = _first_model(page.data, self.base_url)

    async def aclose(self) -> None:
        await self._client.close()

    async def resolve_model(self) -> str:
        if self._model is None:
            try:
                page = await self._client.models.list()
            except openai.OpenAIError as exc:
                raise self._error(exc) from exc
            self._model = _first_model(page.data, self.base_url)
        return self._model

    def _error(self, exc: BaseException) -> LLMError:
        where = f"the LLM server at {self.base_url}"
        # APITimeoutError is an APIConnectionError: test it first
        if isinstance(exc, openai.APITimeoutError) and _timed_out(exc):
            return LLMTimeout(f"{where} timed out")
        if isinstance(exc, openai.APIConnectionError):
            cause = exc.__cause__
            detail = f": {_short(cause)}" if cause is not None and str(cause) else ""
            return LLMUnavailable(f"cannot reach {where}{detail}")
        if isinstance(exc, openai.APIStatusError):
            return LLMError(f"{where} answered {exc.status_code}: {_status_detail(exc)}")
        return LLMError(f"{where} failed: {_short(exc)}")


def _first_model(models: list[Any], base_url: str) -> str:
    if not models:
        raise LLMUnavailable(f"the LLM server at {base_url} lists no models")
    return str(models[0].id)


def _status_detail(exc: openai.APIStatusError) -> str:
    # servers put the reason in different places: OpenAI's {"error": {"message"}},
    # FastAPI's {"detail"}, or nowhere but the status line
    body = exc.body
    if isinstance(body, dict):
        error = body.get("error", body)
        for candidate in (error, body):
            if isinstance(candidate, str) and candidate:
                return candidate.strip().splitlines()[0][:200]
            if isinstance(candidate, dict):
                for key in ("message", "detail"):
                    value = candidate.get(key)
                    if isinstance(value, str) and value:
                        return value.strip().splitlines()[0][:200]
    elif isinstance(body, str) and body.strip():
        return body.strip().splitlines()[0][:200]
    return exc.response.reason_phrase or _short(exc)


def _short(exc: BaseException) -> str:
    message = getattr(exc, "message", None) or str(exc) or type(exc).__name__
    line = str(message).strip().splitlines()[0] if str(message).strip() else type(exc).__name__
    return line[:200]


class _OpenAIGeneration(Generation):
    """The answer's stream, read by the task that iterates it, with no task or queue of its
    own in between: a second task woken for every token cost a few percent of the event loop
    with hundreds of answers streaming. Only sending the request runs as a task of its own,
    so that ``cancel()`` can abort it without touching the caller's task; once the response
    is open, ``cancel()`` closes it, which ends the read at once and tells the server, which
    stops generating."""

    def __init__(
        self,
        llm: OpenAICompatLLM,
        messages: list[Message],
        max_tokens: int,
        temperature: float,
        stop: list[str],
    ) -> None:
        super().__init__()
        self._llm = llm
        self._messages = messages
        self._max_tokens = max_tokens
        self._temperature = temperature
        self._stop = stop
        self._cancelled = False
        self._ended = False
        self._opening: asyncio.Task[Any] | None = None
        self._response: Any = None

    async def cancel(self) -> None:
        if self._ended:
            return
        self._cancelled = True
        if not self._iterated:
            self._end("cancelled")
            return
        opening = self._opening
        if opening is not None and not opening.done():
            # the request is still on its way: abort it, and wait for its connection to close
            opening.cancel()
            await asyncio.wait({opening}, timeout=CANCEL_WAIT_S)
        response = self._response
        if response is not None:
            body = _aiohttp_body(response)
            if body is not None:
                # the read waiting on it, if any, fails at once (the iteration ends
                # "cancelled"); the socket closes a turn of the loop later: wait for it, so
                # that the server has seen the client go when cancel() returns
                connection = body.connection
                protocol = connection.protocol if connection is not None else None
                closed = protocol.closed if protocol is not None else None
                body.close()
                if closed is not None:
                    closed.add_done_callback(_retrieve)
                    await asyncio.wait({closed}, timeout=CANCEL_WAIT_S)
            else:  # another transport: close it the SDK's way
                await asyncio.wait({asyncio.ensure_future(response.close())}, timeout=CANCEL_WAIT_S)

    def _end(self, reason: FinishReason | None) -> None:
        self._ended = True
        if reason is not None and self.finish_reason is None:
            self.finish_reason = reason

    async def _deltas(self) -> AsyncIterator[str]:
        if self._ended:
            return
        try:
            async with contextlib.AsyncExitStack() as stack:
                response = await self._open_unless_cancelled(stack)
                if response is None:
                    self._end("cancelled")
                    return
                self._response = response
                reason: FinishReason = "stop"
                usage_seen = False
                read = _Read()
                body = _aiohttp_body(response)
                if body is not None:
                    stack.enter_context(self._llm._idle.watch(body, read))
                chunks = _chunks(response, self._llm.base_url, read)
                async with contextlib.aclosing(chunks):
                    async for chunk in chunks:
                        if self._cancelled:  # what this read still held is not wanted
                            break
                        usage = chunk.get("usage")
                        if isinstance(usage, dict):
                            usage_seen = True
                            self.usage.prompt_tokens = int(usage.get("prompt_tokens") or 0)
                            self.usage.completion_tokens = int(usage.get("completion_tokens") or 0)
                        choices = chunk.get("choices")
                        if not choices or not isinstance(choices, list):
                            continue
                        choice = choices[0]
                        delta = choice.get("delta")
                        content = delta.get("content") if isinstance(delta, dict) else None
                        if content:
                            self.produced += 1
                            yield str(content)
                            # let what the consumer started with it (a log append scheduled
                            # for the loop's next turn) go out before the rest of this read
                            # is parsed: a fast server's whole answer can sit in one network
                            # read. (Yielding only every 32 deltas streamed 4x faster but
                            # added ~3 ms to the next answer's first token,
                            # benchmarks/relay_overhead.py side by side.) With nothing more
                            # of this read to parse, the next read yields anyway: a paced
                            # model's token comes alone.
                            if read.more:
                                await asyncio.sleep(0)
                        if choice.get("finish_reason") == "length":
                            reason = "length"
            if self._cancelled:
                self._end("cancelled")
                return
            if not usage_seen:
                # the server sent no usage: estimate it the way count_tokens does
                self.usage.prompt_tokens = sum(
                    self._llm.count_tokens(m.get("content", "")) for m in self._messages
                )
                self.usage.completion_tokens = self.produced
            self._end(reason)
        except Exception as exc:
            if self._cancelled:  # closing the response ends its read with an error
                self._end("cancelled")
                return
            self._end(None)
            raise self._as_llm_error(exc) from exc
        finally:
            # the consumer left early (GeneratorExit) or its task was cancelled: the stack
            # has closed the response, and with it the connection
            self._response = None
            if not self._ended:
                self._end("cancelled")

    def _as_llm_error(self, exc: Exception) -> LLMError:
        if isinstance(exc, LLMError):
            return exc
        if isinstance(exc, openai.OpenAIError):
            return self._llm._error(exc)
        # a malformed chunk, say: still one error type for callers
        return LLMError(f"the LLM server at {self._llm.base_url} failed: {_short(exc)}")

    async def _open_unless_cancelled(self, stack: contextlib.AsyncExitStack) -> Any:
        """The open response, or None when ``cancel()`` came first. The request is sent by a
        task of its own, which ``cancel()`` may cancel; the caller's task is never touched."""
        if self._cancelled:
            return None
        opening = self._opening = asyncio.ensure_future(self._open(stack))
        try:
            await asyncio.wait({opening})
        except asyncio.CancelledError:  # the caller's own task is being cancelled
            opening.cancel()
            await asyncio.wait({opening}, timeout=CANCEL_WAIT_S)
            raise
        finally:
            self._opening = None
        if opening.cancelled():
            return None
        response = opening.result()  # raises what sending the request raised
        # cancel() may have come as it opened: the stack closes it
        return None if self._cancelled else response

    async def _open(self, stack: contextlib.AsyncExitStack) -> Any:
        llm = self._llm
        # the SDK sends the request (retries, timeouts, status errors); the event stream is
        # read here: an OpenAI chunk is a few fields, and building the SDK's model of each one
        # cost more than all the rest of relaying it to the clients
        model = await llm.resolve_model()
        if llm._usage_option:
            try:
                return await stack.enter_async_context(self._request(model, usage=True))
            except (openai.BadRequestError, openai.UnprocessableEntityError) as exc:
                # an older server that rejects stream_options: ask without it from now on
                # and estimate usage; any other bad request is the caller's error
                if "stream_options" not in f"{exc} {exc.body}":
                    raise
                llm._usage_option = False
        return await stack.enter_async_context(self._request(model, usage=False))

    def _request(self, model: str, *, usage: bool) -> Any:
        stop: list[str] | openai.Omit = self._stop or openai.omit
        return self._llm._client.chat.completions.with_streaming_response.create(
            model=model,
            # the messages go in as extra_body (merged over the params): the SDK's request
            # transform walks each message through the annotations of all six message types
            # (a Union), and did so for every question: 10% of the event loop with 500
            # clients asking (py-spy). Plain role/content dicts need no transform.
            messages=[],
            extra_body={"messages": self._messages},
            max_tokens=self._max_tokens,
            temperature=self._temperature,
            stop=stop,
            stream=True,
            stream_options={"include_usage": True} if usage else openai.omit,
        )


def _retrieve(future: asyncio.Future[Any]) -> None:
    """Marks a future's exception as seen (a connection that closed with an error)."""
    if not future.cancelled():
        future.exception()


def _aiohttp_body(response: Any) -> aiohttp.ClientResponse | None:
    """The aiohttp response under the SDK's, when it reads through the aiohttp transport.

    Reading the event stream straight from it skips six layers of async iterators (the
    transport's stream, httpx2's raw, bytes, text and line decoders, the SDK's lines): a third
    of the time it took to relay a token with hundreds of answers streaming. These are
    private attributes of the SDK's vendored transport; where they are not there (another
    SDK, another transport) the SDK's own line iterator is used, as before
    (tests/llm/test_openai_compat.py checks which path the installed SDK takes)."""
    stream = getattr(getattr(response, "http_response", None), "stream", None)
    stream = getattr(stream, "_stream", stream)  # httpx2's BoundAsyncStream wraps it
    body = getattr(stream, "_aiohttp_response", None)
    return body if isinstance(body, aiohttp.ClientResponse) else None


class _Read:
    """Whether lines of the read that gave the last line are still to come (``_lines`` keeps
    it; True where it cannot tell), and how many network reads the stream has had."""

    __slots__ = ("more", "reads")

    def __init__(self) -> None:
        self.more = True
        self.reads = 0


class _IdleStreams:
    """The read timeout of the open streams (the longest wait for their next bytes), kept by
    one timer for all of them.

    aiohttp keeps a read timeout per connection by moving a timer at every network read
    (cancel it, schedule a new one): with a paced model that is a timer per token, 3.5% of
    the server's event loop with 1,000 answers streaming (py-spy). Once a stream's response
    is open (aiohttp's timeout has covered the wait for its headers), its connection's
    timeout is switched off and the stream is watched here instead: a check every quarter of
    the timeout (at most a second) compares each stream's count of reads with the last
    check's, and fails a stream that has had none for the timeout — the same error aiohttp
    raises, so the caller still gets ``LLMTimeout`` — between 1 and 1.25 timeouts after its
    last bytes. A read costs one increment."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.every_s = min(1.0, timeout_s / 4)
        self._streams: dict[_Read, list[Any]] = {}  # read -> [reads seen, since, body]
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @contextlib.contextmanager
    def watch(self, body: aiohttp.ClientResponse, read: _Read) -> Iterator[None]:
        connection = body.connection
        protocol = connection.protocol if connection is not None else None
        if protocol is None or not self.timeout_s:
            yield  # nothing to take over (an unreachable case: aiohttp's timeout stays)
            return
        # aiohttp sets it again for the connection's next request; a timer it already armed
        # is dropped at the next read, or fires as before
        protocol.read_timeout = None
        loop = asyncio.get_running_loop()
        self._streams[read] = [read.reads, loop.time(), body]
        if self._timer is None or self._loop is not loop:  # (a closed loop's timer is dead)
            self._loop = loop
            self._timer = loop.call_later(self.every_s, self._check)
        try:
            yield
        finally:
            self._streams.pop(read, None)

    def _check(self) -> None:
        self._timer = None
        if not self._streams:
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        for read, seen in list(self._streams.items()):
            if read.reads != seen[0]:
                seen[0], seen[1] = read.reads, now
            elif now - seen[1] >= self.timeout_s:
                del self._streams[read]
                # what aiohttp's own read timeout raises: the read waiting on it fails now
                seen[2].content.set_exception(
                    aiohttp.SocketTimeoutError("Timeout on reading data from socket")
                )
        if self._streams:
            self._timer = loop.call_later(self.every_s, self._check)


async def _reads(response: Any, read: _Read) -> AsyncGenerator[tuple[list[str], bool], None]:
    """The event stream's lines (without their ends), a list for each network read, then a
    last list (``True`` beside it) ending with one empty line: the end of the body
    dispatches an event that had no blank line after it. Handed over a read at a time, so
    that the usual read (one token's event: a data line and a blank one) costs the reader
    one resumption, not two."""
    body = _aiohttp_body(response)
    if body is None:
        async for line in response.iter_lines():
            yield [line], False
        yield [""], True
        return
    rest = b""
    # each read is whatever the network has brought (often one token's event); a line cut
    # between reads waits in ``rest``; CRLF and lone CR end lines too (the SSE spec)
    async for data in body.content.iter_any():
        read.reads += 1
        data = rest + data if rest else data
        if b"\r" in data:
            if data.endswith(b"\r"):  # maybe half of a CRLF: decide with the next read
                data, rest = data[:-1], b"\r"
            else:
                rest = b""
            data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        else:
            rest = b""
        *lines, tail = data.split(b"\n")
        # a held-back CR ends ``tail`` as a line whatever comes next
        rest = tail + b"\r" if rest else tail
        if lines:
            yield [line.decode("utf-8", "replace") for line in lines], False
    if rest.rstrip(b"\r"):
        yield [rest.rstrip(b"\r").decode("utf-8", "replace"), ""], True
    else:
        yield [""], True


async def _lines(response: Any, read: _Read | None = None) -> AsyncIterator[str]:
    """``_reads`` a line at a time; ``read.more`` says, with each line, whether more lines
    of the same network read follow it (True for the end's lines: it cannot tell)."""
    read = read or _Read()
    batches = _reads(response, read)
    async with contextlib.aclosing(batches):
        async for lines, end in batches:
            last = len(lines) - 1
            for i, line in enumerate(lines):
                read.more = end or i < last
                yield line


async def _chunks(
    response: Any, base_url: str, read: _Read | None = None
) -> AsyncGenerator[dict[str, Any], None]:
    """The JSON objects of a chat-completion event stream (Server-Sent Events), up to
    ``[DONE]``; an ``error`` event or an ``{"error": ...}`` object raises LLMError. ``read``:
    as for ``_lines`` (an object is dispatched by the blank line after it)."""
    read = read or _Read()
    event = ""
    data: list[str] = []
    batches = _reads(response, read)
    try:
        async with contextlib.aclosing(batches):
            async for lines, end in batches:
                last = len(lines) - 1
                for i, line in enumerate(lines):
                    if line:
                        field, _, value = line.partition(":")
                        value = value[1:] if value.startswith(" ") else value
                        if field == "data":
                            data.append(value)
                        elif field == "event":
                            event = value
                        continue  # comments (": ping"), id:, retry:
                    if not data:
                        continue
                    text, kind, event, data = "\n".join(data), event, "", []
                    if text.strip() == "[DONE]":
                        return
                    chunk = _loads(text)
                    if kind == "error" or (
                        isinstance(chunk, dict) and chunk.get("error") is not None
                    ):
                        error = chunk.get("error", chunk) if isinstance(chunk, dict) else chunk
                        message = error.get("message") if isinstance(error, dict) else error
                        raise LLMError(f"the LLM server at {base_url} failed: {str(message)[:200]}")
                    if isinstance(chunk, dict):
                        read.more = end or i < last
                        yield chunk
    except _READ_TIMEOUTS as exc:
        if _timed_out(exc):
            raise LLMTimeout(f"the LLM server at {base_url} timed out") from exc
        raise LLMUnavailable(f"cannot reach the LLM server at {base_url}: {_short(exc)}") from exc
    except _READ_ERRORS as exc:  # the server died or dropped the connection
        raise LLMUnavailable(f"cannot reach the LLM server at {base_url}: {_short(exc)}") from exc


def _timed_out(exc: BaseException) -> bool:
    """False for a "timeout" that was a refused or dropped connection: the SDK's aiohttp
    transport maps every aiohttp connection error, ConnectionRefused included, to
    ConnectTimeout; the aiohttp error it came from tells."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, aiohttp.ClientError):
            return isinstance(seen, aiohttp.ServerTimeoutError)
        seen = seen.__cause__ or seen.__context__
    return True


def _loads(text: str) -> Any:
    return orjson.loads(text) if orjson is not None else json.loads(text)
