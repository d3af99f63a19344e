"""Responses that notice a client going away, so its request is aborted at once.

A request handler can't rely on a failed write to learn of a disconnect (nothing is written while a request
waits for its first token), so both helpers race the work against the ASGI ``http.disconnect`` message, as vLLM
does.  ``EventStreamResponse`` streams server-sent events (``data: {...}`` lines, then ``data: [DONE]``) and closes
its event generator when the client leaves, which runs the generator's ``finally`` (``run_choices`` aborts the
unfinished choices there), then calls its ``on_close`` (the handlers abort the request there too, for a client
that left before the generator got to ``run_choices``).  ``unless_disconnected`` runs a non-streamed handler's
coroutine and cancels it if the client leaves first.
"""
import asyncio
import json

from starlette.responses import Response


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


DONE = "data: [DONE]\n\n"


async def _wait_for_disconnect(receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


class EventStreamResponse(Response):
    media_type = "text/event-stream"

    def __init__(self, events, on_close=None):
        self.events = events  # an async generator of ``str`` chunks
        self.on_close = on_close  # called once the stream has ended, whether or not ``events`` got to start
        self.status_code, self.background = 200, None
        self.init_headers({"Cache-Control": "no-cache"})  # no body attribute: no Content-Length

    async def __call__(self, scope, receive, send) -> None:
        async def pump():
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            async for chunk in self.events:
                await send({"type": "http.response.body", "body": chunk.encode(), "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        stream = asyncio.create_task(pump())
        listener = asyncio.create_task(_wait_for_disconnect(receive))
        try:
            await asyncio.wait({stream, listener}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            listener.cancel()
            stream.cancel()
            results = await asyncio.gather(stream, listener, return_exceptions=True)
            await self.events.aclose()
            if self.on_close is not None:
                self.on_close()
        error = results[0]
        if isinstance(error, BaseException) and not isinstance(error, (asyncio.CancelledError, OSError)):
            raise error


async def unless_disconnected(request, coroutine):
    """The coroutine's result, or None (and the coroutine cancelled) if the client disconnects first."""
    work = asyncio.create_task(coroutine)
    listener = asyncio.create_task(_wait_for_disconnect(request.receive))
    try:
        await asyncio.wait({work, listener}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        listener.cancel()
        if not work.done():
            work.cancel()  # its ``finally`` blocks abort the request's sequences
        await asyncio.gather(work, listener, return_exceptions=True)
    if work.cancelled():
        return None
    return work.result()
