"""securechan benchmark suite: ``python -m benchmarks`` (``--quick`` for a short run).

Sections: the cipher path without sockets, one channel connection against plain TCP and
asyncio + ssl, many connections and idle memory, handshakes, and the tunnel against
stunnel and spiped. See benchmarks/README.md for how to read the output.
"""
