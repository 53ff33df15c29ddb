"""A TCP relay the test owns, between a client and a server (tests/test_faults.py).

    relay = Relay("127.0.0.1", 5432)   # listens on 127.0.0.1:relay.port
    relay.stall()    # stop forwarding, both ways, without closing anything
    relay.resume()   # forward again (what was sent meanwhile is delivered)
    relay.cut()      # close every relayed socket, both sides (new connections still pass)
    relay.close()

Threads, not a process: it ends with the test.
"""

from __future__ import annotations

import contextlib
import select
import socket
import threading


class Relay:
    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._flowing = threading.Event()
        self._flowing.set()
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._sockets += [client, server]
            threading.Thread(target=self._pump, args=(client, server), daemon=True).start()

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        peer = {a: b, b: a}
        try:
            while True:
                self._flowing.wait()
                ready, _, _ = select.select([a, b], [], [], 0.05)
                if not self._flowing.is_set():
                    continue  # stalled: read nothing, so nothing is forwarded
                for sock in ready:
                    data = sock.recv(65536)
                    if not data:
                        return
                    peer[sock].sendall(data)
        except (OSError, ValueError):
            return
        finally:
            self._drop(a, b)

    def _drop(self, *socks: socket.socket) -> None:
        for sock in socks:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                sock.close()
            with self._lock, contextlib.suppress(ValueError):
                self._sockets.remove(sock)

    def stall(self) -> None:
        self._flowing.clear()

    def resume(self) -> None:
        self._flowing.set()

    def cut(self) -> None:
        with self._lock:
            socks = list(self._sockets)
        self._drop(*socks)

    def connections(self) -> int:
        with self._lock:
            return len(self._sockets) // 2

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self._listener.close()
        self.cut()
        self._flowing.set()
