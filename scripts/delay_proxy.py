#!/usr/bin/env python3
"""A TCP proxy on loopback that adds a fixed round-trip delay, for `make bench` (the kernel here has no netem).

    delay_proxy.py LISTEN_PORT TARGET_PORT RTT_MS

Every chunk of bytes is forwarded RTT_MS / 2 after it arrived, in each direction, in order: one HTTP request and
its answer therefore take RTT_MS longer, as on a link with that round trip, while many connections (and
requests kept in flight on them) overlap freely. Prints "ready" once it listens.
"""
import asyncio
import sys


async def pipe(reader, writer, delay_s):
    """Forwards reader -> writer, each chunk delay_s after it arrived; passes a half-close on (write_eof) and stops
    reading when the other side is gone. At most 256 chunks wait, so a slow reader slows the sender."""
    loop = asyncio.get_running_loop()
    queue = asyncio.Queue(maxsize=256)
    gone = asyncio.Event()

    async def forward():
        try:
            while True:
                due, data = await queue.get()
                wait = due - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                if data is None:
                    if writer.can_write_eof():
                        writer.write_eof()
                    break
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            writer.close()
        finally:
            gone.set()

    sender = asyncio.create_task(forward())
    try:
        while not gone.is_set():
            data = await reader.read(65536)
            await queue.put((loop.time() + delay_s, data or None))
            if not data:
                break
    except (ConnectionError, OSError, asyncio.CancelledError):
        sender.cancel()
        writer.close()
    await asyncio.gather(sender, return_exceptions=True)


async def main(listen_port, target_port, rtt_ms):
    half = rtt_ms / 2000.0

    async def handle(client_reader, client_writer):
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", target_port)
        except OSError:
            client_writer.close()
            return
        await asyncio.gather(
            pipe(client_reader, upstream_writer, half),
            pipe(upstream_reader, client_writer, half),
            return_exceptions=True,
        )
        for w in (upstream_writer, client_writer):
            w.close()

    server = await asyncio.start_server(handle, "127.0.0.1", listen_port, backlog=256)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])))
