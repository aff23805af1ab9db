"""A lean client of Triton's HTTP `generate_stream`: many concurrent streams on one asyncio loop.

Benchmarks that compare throughput through two paths must not be limited by
their own client, so this one parses only what it counts: each server-sent
event's JSON, over raw HTTP/1.1 chunked transfer, with no thread per stream.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit


@dataclass(slots=True)
class StreamResult:
    """One streamed request: when it started, when each event with output arrived, what it carried."""

    start_s: float
    event_times_s: list[float] = field(default_factory=list)
    events: list[dict] = field(default_factory=list)

    @property
    def end_s(self) -> float:
        return self.event_times_s[-1] if self.event_times_s else self.start_s


async def _stream(host: str, port: int, path: str, body: dict, keep_events: bool) -> StreamResult:
    reader, writer = await asyncio.open_connection(host, port)
    payload = json.dumps(body).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n"
    ).encode()
    result = StreamResult(start_s=time.perf_counter())
    writer.write(head + payload)
    await writer.drain()
    try:
        status = await reader.readline()
        if b" 200 " not in status:
            raise RuntimeError(f"{path} answered {status.decode(errors='replace').strip()}: {(await reader.read(2000)).decode(errors='replace')}")
        chunked = False
        while (line := await reader.readline()) not in (b"\r\n", b""):
            chunked |= line.lower().startswith(b"transfer-encoding:") and b"chunked" in line.lower()
        buffer = b""
        while True:
            if chunked:
                size = int((await reader.readline()).split(b";")[0], 16)
                if size == 0:
                    break
                buffer += await reader.readexactly(size + 2)
                buffer = buffer[:-2] if buffer.endswith(b"\r\n") else buffer
            else:
                data = await reader.read(65536)
                if not data:
                    break
                buffer += data
            *events, buffer = buffer.split(b"\n\n")
            for event in events:
                if not event.startswith(b"data:"):
                    continue
                parsed = json.loads(event[5:])
                if "error" in parsed:
                    raise RuntimeError(f"stream error: {parsed['error']}")
                result.event_times_s.append(time.perf_counter())
                if keep_events:
                    result.events.append(parsed)
    finally:
        writer.close()
    return result


async def _run_all(url: str, bodies: list[dict], concurrency: int, keep_events: bool) -> list[StreamResult]:
    parts = urlsplit(url)
    semaphore = asyncio.Semaphore(concurrency)

    async def one(body: dict) -> StreamResult:
        async with semaphore:
            return await _stream(parts.hostname, parts.port or 80, parts.path, body, keep_events)

    return await asyncio.gather(*(one(body) for body in bodies))


def stream_many(
    url: str, bodies: list[dict], concurrency: int, keep_events: bool = False, timeout_s: float = 300.0
) -> list[StreamResult]:
    """POST every body to `url` (a `generate_stream` URL), at most `concurrency` at a time; results in order.

    Raises RuntimeError on an HTTP error or an error event, TimeoutError after `timeout_s` in all.
    """
    return asyncio.run(asyncio.wait_for(_run_all(url, bodies, concurrency, keep_events), timeout_s))
