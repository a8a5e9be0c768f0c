"""Server-side TLS: the context (built once, in the listener) and the worker's stream.

The listener builds the :class:`ssl.SSLContext` before it drops privileges (the
key file may be readable by root only) and never handshakes itself: a slow or
hostile client must not stall the accept loop.  Each worker runs the handshake
on its own connection, bounded by ``handshake_timeout``.

The worker reads and writes from different threads (leader/follower), and an
OpenSSL connection object must not be used by two threads at once.  So
:class:`TlsStream` drives an :class:`ssl.SSLObject` over memory BIOs under one
lock and does the socket I/O itself, outside the lock: a thread blocked in
``recv`` never keeps another from sending a reply.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable
from typing import cast

from ..config.model import Listener, ServerConfig, TlsConfig

log = logging.getLogger("p11guard.tls")

RECV_CHUNK = 64 * 1024

# Caml Crush's GnuTLS priority strings mean nothing to OpenSSL.
_GNUTLS_HINT = "tls.algorithms is a GnuTLS priority string (Caml Crush); p11guard uses " \
               "OpenSSL's defaults (set tls.ciphers in a TOML file to restrict TLS 1.2 ciphers)"


def _openssl_clear_errors() -> Callable[[], None]:
    """ERR_clear_error of the libcrypto the ssl module uses.

    OpenSSL's error queue is per thread and shared by every user of the library
    in the process.  A PKCS#11 module built on the same libcrypto (SoftHSM is)
    can leave an error there, which the next TLS read on that thread would
    report as its own failure.  So the queue is cleared before each TLS call.
    """
    path = None
    with contextlib.suppress(OSError), open("/proc/self/maps") as maps:
        for line in maps:
            if "libcrypto" in line and "/" in line:
                path = line[line.index("/"):].strip()
                break
    if path is not None:
        with contextlib.suppress(OSError, AttributeError):
            fn = ctypes.CDLL(path).ERR_clear_error
            fn.restype = None
            fn.argtypes = []
            return cast(Callable[[], None], fn)
    return lambda: None


_clear_errors = _openssl_clear_errors()


class TlsError(Exception):
    """The handshake failed or timed out; the message is safe to log.

    ``probe``: the peer closed without sending a byte (a port check, not a client).
    """

    def __init__(self, message: str, probe: bool = False) -> None:
        super().__init__(message)
        self.probe = probe


def listener_uses_tls(spec: Listener, config: ServerConfig) -> bool:
    """TLS on this listener?  Explicit ``tls`` wins; by default TCP listeners when [tls] is set."""
    if config.tls is None:
        return False
    if spec.tls is not None:
        return spec.tls
    return spec.kind == "tcp"


def server_context(tls: TlsConfig) -> ssl.SSLContext:
    """A server context: TLS >= 1.2, client certificates per ``peer_auth``."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = (ssl.TLSVersion.TLSv1_3 if tls.min_version == "1.3"
                           else ssl.TLSVersion.TLSv1_2)
    # No compression (CRIME), no renegotiation (a client-driven CPU sink), server's order.
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    ctx.options |= getattr(ssl, "OP_NO_RENEGOTIATION", 0)
    if tls.ciphers:
        ctx.set_ciphers(tls.ciphers)
    else:
        # Forward-secret AEAD suites only for TLS 1.2 (TLS 1.3 has nothing else).
        ctx.set_ciphers("ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20")
    if tls.algorithms:
        log.info("%s", _GNUTLS_HINT)
    ctx.load_cert_chain(tls.cert_file, tls.key_file)
    if tls.ca_file:
        ctx.load_verify_locations(cafile=tls.ca_file)
    if tls.peer_auth == "required":
        if not tls.ca_file:
            raise ValueError("tls: peer_auth = required needs a CA file (ca_file / trust)")
        ctx.verify_mode = ssl.CERT_REQUIRED
    elif tls.peer_auth == "optional":
        ctx.verify_mode = ssl.CERT_OPTIONAL if tls.ca_file else ssl.CERT_NONE
    else:
        ctx.verify_mode = ssl.CERT_NONE
    # One connection per worker process: a resumption ticket could never be used
    # (and would be one more record sent after the handshake).
    ctx.num_tickets = 0
    return ctx


class TlsStream:
    """A TLS connection with the three socket methods the worker uses.

    ``recv`` may be called by one thread while others call ``sendall``.
    """

    def __init__(self, sock: socket.socket, context: ssl.SSLContext) -> None:
        self.sock = sock
        self.family = sock.family
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self._obj = context.wrap_bio(self._in, self._out, server_side=True)
        self._lock = threading.Lock()  # the SSLObject and the order of outgoing bytes
        self._eof = False

    # -- handshake ----------------------------------------------------------------

    def handshake(self, timeout: float) -> None:
        """Complete the handshake within ``timeout`` seconds, or raise :class:`TlsError`."""
        deadline = time.monotonic() + timeout
        received = False
        try:
            while True:
                try:
                    _clear_errors()
                    self._obj.do_handshake()
                    self._flush()
                    return
                except ssl.SSLWantReadError:
                    self._flush()
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise TlsError(f"handshake not finished after {timeout:g}s") from None
                    self.sock.settimeout(remaining)
                    data = self.sock.recv(RECV_CHUNK)
                    if not data:
                        raise TlsError("peer closed the connection during the handshake",
                                       probe=not received) from None
                    received = True
                    self._in.write(data)
        except ssl.SSLError as exc:
            # Send the alert OpenSSL queued, so the client learns why.
            with contextlib.suppress(OSError):
                self._flush()
            detail = str(exc.reason or exc)
            if isinstance(exc, ssl.SSLCertVerificationError) and exc.verify_message:
                detail += f" (client certificate: {exc.verify_message})"
            raise TlsError(f"handshake failed: {detail}") from None
        except TimeoutError:
            raise TlsError(f"handshake not finished after {timeout:g}s") from None
        except OSError as exc:
            raise TlsError(f"handshake failed: {exc}") from None
        finally:
            with contextlib.suppress(OSError):
                self.sock.settimeout(None)

    def peer_certificate(self) -> bytes | None:
        return self._obj.getpeercert(binary_form=True)

    def version(self) -> str | None:
        return self._obj.version()

    def cipher(self) -> str | None:
        c = self._obj.cipher()
        return c[0] if c else None

    # -- the socket methods the worker uses ---------------------------------------------

    def recv(self, bufsize: int) -> bytes:
        while True:
            with self._lock:
                try:
                    _clear_errors()
                    data = self._obj.read(bufsize)
                except ssl.SSLWantReadError:
                    data = None
                except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                    return b""  # close_notify, or a client that just closed the socket
                except ssl.SSLError as exc:
                    raise OSError(f"TLS error: {exc.reason or exc}") from None
                # Reading may queue records for the peer (TLS 1.3 key update answers).
                pending = self._out.read()
            if pending:
                self.sock.sendall(pending)
            if data is not None:
                return data
            if self._eof:
                return b""
            raw = self.sock.recv(RECV_CHUNK)
            with self._lock:
                if raw:
                    self._in.write(raw)
                else:
                    self._eof = True
                    self._in.write_eof()

    def sendall(self, data: bytes | bytearray) -> None:
        with self._lock:
            try:
                _clear_errors()
                self._obj.write(data)
            except ssl.SSLError as exc:
                raise OSError(f"TLS error: {exc.reason or exc}") from None
            # Sent under the lock: records must leave in the order they were sealed.
            self._flush()

    def shutdown(self, how: int) -> None:
        self.sock.shutdown(how)

    def close(self) -> None:
        """Send close_notify (best effort) and close the socket."""
        with contextlib.suppress(OSError, ssl.SSLError, ValueError), self._lock:
            _clear_errors()
            with contextlib.suppress(ssl.SSLWantReadError):  # no wait for the peer's
                self._obj.unwrap()
            self.sock.settimeout(1.0)
            self._flush()
        self.sock.close()

    def _flush(self) -> None:
        pending = self._out.read()
        if pending:
            self.sock.sendall(pending)
