"""Limits that keep one bad or greedy client from taking the hidden-state server down.

Each limit stops a request before the expensive step it guards:

* ``max_body_bytes``, before the body is parsed: a declared ``Content-Length`` over it is answered
  413 before a byte of the body is read, and a streamed (chunked) body is counted while it arrives
  and refused the moment it passes the limit. Without it a 50 MB body cost the server 3 GB that
  it never gave back (JSON parsing, then pydantic's copies).
* ``max_text_chars``, before tokenising: a 10 MB text took 36 s of tokeniser time, blocking every
  other request behind it, only to be refused for being longer than ``max_length`` tokens.
* ``max_image_bytes`` and ``max_image_pixels``, before decoding a frame (``servers/images.py``):
  a PNG's size is read from its header, a raw frame's from ``X-Shape``, so a few hundred bytes
  claiming 50,000 x 50,000 pixels are refused without allocating them.
* ``max_queue`` (in ``servers/batching.py``): texts waiting for the model; past it a request gets
  429 with ``Retry-After`` instead of a place in an ever longer queue.
* ``request_timeout_s``: a request not computed within it gets 504, and the batcher drops it.
* ``unhealthy_after``: that many model calls failing in a row turn ``/health`` into a 503.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence

from fastapi import HTTPException

from utils.errors import UserError

MB = 1_000_000


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one request may carry and how long it may wait; see the module docstring."""

    max_body_bytes: int = 32 * MB
    max_text_chars: int = 32_768
    max_image_bytes: int = 4 * MB
    """Largest PNG (after base64 decoding); a raw frame's size follows from its pixels."""
    max_image_pixels: int = 1 << 20
    """Most pixels (height x width) of one frame: 1024 x 1024. Craftax frames have 4,000 to 15,000."""
    max_queue: int = 1024
    request_timeout_s: float = 60.0
    unhealthy_after: int = 3

    def check(self) -> "Limits":
        for name in ("max_body_bytes", "max_image_bytes"):  # given in MB on the command line
            if getattr(self, name) < 1:
                flag = "--" + name.replace("_bytes", "_mb").replace("_", "-")
                raise UserError(f"{flag} must be more than 0, got {getattr(self, name) / MB:g}")
        for name in ("max_text_chars", "max_image_pixels", "max_queue", "unhealthy_after"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if not self.request_timeout_s > 0:
            raise UserError(f"--request-timeout-s must be more than 0, got {self.request_timeout_s}")
        return self


def check_texts(texts: Sequence[str], max_chars: int) -> None:
    """413 for a text over ``max_chars`` characters, 422 for one that is not valid Unicode (a lone
    UTF-16 surrogate such as ``"\\ud800"``, which JSON allows but no tokeniser can encode)."""
    for i, text in enumerate(texts):
        if len(text) > max_chars:
            raise HTTPException(413, f"text {i} has {len(text):,} characters, more than this server's "
                                     f"limit of {max_chars:,} (--max-text-chars); shorten it")
        if not text.isascii():
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as error:
                raise HTTPException(422, f"text {i} is not valid Unicode: lone surrogate "
                                         f"{ascii(text[error.start])} at character {error.start}; "
                                         "JSON \\uXXXX escapes of surrogates must come in pairs"
                                         ) from None


def printable(text: str) -> str:
    """``text`` safe to put in a UTF-8 answer: a lone surrogate from the request (in a field name,
    say) becomes its ``\\udXXX`` escape instead of failing the answer's encoding with a 500."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


class BodyLimit:
    """ASGI middleware: POST bodies of at most ``max_bytes``, read in full before the app sees them.

    A body over the limit gets 413 with ``Connection: close`` (the rest of it is never read); the
    body is then handed to the app as one message. After it, ``receive`` is the server's own, so the
    app still hears ``http.disconnect`` when the client goes away."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, int(max_bytes)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            if not declared.strip().isdigit():
                await _refuse(send, 400, f"Content-Length {declared[:40].decode('latin-1')!r} is not "
                                         "a number")
                return
            if int(declared) > self.max_bytes:
                await _refuse(send, 413, self._too_big(f"{int(declared):,} bytes"))
                return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client left before sending its body: nobody to answer
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await _refuse(send, 413, self._too_big(f"more than {self.max_bytes:,} bytes (sent "
                                                       "chunked)"))
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        del chunks
        delivered = False

        async def replay():
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    def _too_big(self, what: str) -> str:
        return (f"request body of {what} is over this server's limit of {self.max_bytes:,} bytes "
                "(--max-body-mb); send fewer items per request")


async def _refuse(send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()), (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


__all__ = ["Limits", "BodyLimit", "check_texts", "printable", "MB"]
