"""Resident memory of meshd through bursts of client connections (run by bench/memory.sh).

usage: memory.py CONNECTIONS BURSTS NAME=BINARY [NAME=BINARY ...]

For each binary: starts `meshd dev` in front of a backend that answers after 300 ms, then BURSTS times opens
CONNECTIONS client connections at once, each with a request in flight, reads every response, closes them all,
and samples VmRSS at the peak and 1, 5 and 10 s after. Prints one Markdown table row per binary and burst.
"""

import asyncio
import os
import re
import subprocess
import sys
import time

BACKEND_DELAY = 0.3


def rss_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


async def backend(reader, writer):
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            if not head:
                return
            await asyncio.sleep(BACKEND_DELAY)
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def one_client(port):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n")
    await writer.drain()
    return reader, writer


async def burst(port, n):
    opened = await asyncio.gather(*(one_client(port) for _ in range(n)), return_exceptions=True)
    conns = [c for c in opened if not isinstance(c, BaseException)]

    async def answer(reader):
        try:
            line = await asyncio.wait_for(reader.readline(), 30)
            return line.startswith(b"HTTP/1.1 200")
        except (asyncio.TimeoutError, ConnectionError):
            return False

    served = sum(await asyncio.gather(*(answer(r) for r, _ in conns)))
    return conns, served


def start_meshd(binary, backend_port):
    proc = subprocess.Popen(
        [binary, "dev", "--service", f"bench=127.0.0.1:{backend_port}", "--listen", "127.0.0.1:0",
         "--admin", "127.0.0.1:0", "--inbound", "127.0.0.1:0"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        env={**os.environ, "RUST_LOG": "warn", "DOCKER_HOST": "unix:///nonexistent"},
    )
    port = None
    for line in proc.stdout:
        m = re.match(r"\s*outbound\s+(?:http://)?127\.0\.0\.1:(\d+)", line)
        if m:
            port = int(m.group(1))
        if "Ctrl-C" in line:
            break
    if port is None:
        proc.kill()
        raise RuntimeError(f"{binary}: no outbound address in its banner")
    return proc, port


async def measure(name, binary, n, bursts, backend_port):
    proc, port = start_meshd(binary, backend_port)
    try:
        await asyncio.sleep(1)
        idle = rss_mib(proc.pid)
        rows = []
        for i in range(bursts):
            started = time.monotonic()
            conns, served = await burst(port, n)
            peak = rss_mib(proc.pid)
            for _, w in conns:
                w.close()
            closed = time.monotonic()
            after = {}
            for at in (1, 5, 10):
                await asyncio.sleep(max(0, closed + at - time.monotonic()))
                after[at] = rss_mib(proc.pid)
            rows.append(
                f"| {name} | {i + 1} | {served}/{n} | {idle:.0f} | {peak:.0f} | {after[1]:.0f} | {after[5]:.0f} "
                f"| {after[10]:.0f} | {closed - started:.1f} |"
            )
        return rows
    finally:
        proc.kill()
        proc.wait()


async def main():
    n, bursts = int(sys.argv[1]), int(sys.argv[2])
    targets = [a.split("=", 1) for a in sys.argv[3:]]
    server = await asyncio.start_server(backend, "127.0.0.1", 0, backlog=8192)
    backend_port = server.sockets[0].getsockname()[1]
    print("| allocator | burst | served | idle MiB | peak MiB | +1 s MiB | +5 s MiB | +10 s MiB | burst s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, binary in targets:
        for row in await measure(name, binary, n, bursts, backend_port):
            print(row, flush=True)
    server.close()


if __name__ == "__main__":
    asyncio.run(main())
