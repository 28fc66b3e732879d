"""Pure DATA-phase decoding: find the end-of-data marker, undo dot-stuffing.

The body is never split into lines in Python: each chunk is searched for
CRLF.CRLF with `bytes.find` and unstuffed with one `bytes.replace`.  What
makes this correct across chunk boundaries is where a chunk is cut: at its
last CRLF.  A dot-stuffed sequence CRLF.. that starts before that CRLF ends
before it too (the bytes at the cut are CR LF, not dots), so the part before
the cut can be unstuffed on its own; the rest (at most one partial line) is
kept for the next chunk and starts with CRLF, which is exactly the context
the next search needs.
"""
from __future__ import annotations

END_OF_DATA = b"\r\n.\r\n"
STUFFED = b"\r\n.."
UNSTUFFED = b"\r\n."
MAX_HELD = 64 * 1024  # longest partial line held back before it is passed on


class DataDecoder:
    """Feed raw DATA bytes; get unstuffed message bytes and the leftover.

    The message is presented as if preceded by CRLF (a dot at the very start
    of the message is a line start too); that CRLF is not part of the output.
    """

    def __init__(self) -> None:
        self._held = b"\r\n"
        self._at_start = True
        self.done = False

    def feed(self, chunk: bytes) -> tuple[bytes, bytes]:
        """Return (message bytes decoded so far, bytes after the end marker).

        After the end marker is seen, `done` is True and the second value
        holds what followed it (pipelined commands).
        """
        buffer = self._held + chunk
        end = buffer.find(END_OF_DATA)
        if end >= 0:
            self.done = True
            return self._emit(buffer[: end + 2]), buffer[end + 5:]
        cut = buffer.rfind(b"\r\n")
        if cut <= 0 and len(buffer) > MAX_HELD:
            cut = len(buffer) - 4  # a very long line: no CRLF.. can start in it
        if cut <= 0:
            self._held = buffer
            return b"", b""
        self._held = buffer[cut:]
        return self._emit(buffer[:cut]), b""

    def _emit(self, part: bytes) -> bytes:
        decoded = part.replace(STUFFED, UNSTUFFED) if b"\r\n." in part else part
        if self._at_start:
            self._at_start = False
            return decoded[2:]
        return decoded
