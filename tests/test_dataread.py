"""DATA decoding: terminator search and dot-unstuffing across chunk boundaries."""
from hypothesis import given, settings, strategies as st

from mta.dataread import DataDecoder


def stuff(message: bytes) -> bytes:
    """What a client sends for `message` (CRLF lines): dots doubled, then CRLF.CRLF."""
    lines = message.split(b"\r\n")
    return b"\r\n".join(b"." + line if line.startswith(b".") else line for line in lines) + b".\r\n"


def decode(chunks):
    decoder, out, rest = DataDecoder(), [], b""
    for index, chunk in enumerate(chunks):
        decoded, after = decoder.feed(chunk)
        out.append(decoded)
        if decoder.done:
            rest = after + b"".join(chunks[index + 1:])
            break
    return b"".join(out), decoder.done, rest


def test_simple_and_empty_messages():
    assert decode([b"Subject: x\r\n\r\nhi\r\n.\r\n"]) == (b"Subject: x\r\n\r\nhi\r\n", True, b"")
    assert decode([b".\r\n"]) == (b"", True, b"")
    assert decode([b"..\r\n.\r\nQUIT\r\n"]) == (b".\r\n", True, b"QUIT\r\n")


def test_terminator_split_one_byte_at_a_time():
    wire = b"a\r\n..b\r\n.\r\nMAIL FROM:<>\r\n"
    message, done, rest = decode([bytes([b]) for b in wire])
    assert (message, done) == (b"a\r\n.b\r\n", True)


def test_not_done_without_terminator():
    message, done, _ = decode([b"a\r\n.\r", b"x\r\n"])
    assert not done


lines = st.lists(st.binary(max_size=30).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")), max_size=20)


@settings(max_examples=300, deadline=None)
@given(lines=lines, cuts=st.lists(st.integers(min_value=1, max_value=40), max_size=30), tail=st.binary(max_size=10))
def test_roundtrip_any_chunking(lines, cuts, tail):
    message = b"".join(line + b"\r\n" for line in lines)
    wire = stuff(message) + tail
    chunks, position = [], 0
    for cut in cuts:
        chunks.append(wire[position:position + cut])
        position += cut
    chunks.append(wire[position:])
    decoded, done, rest = decode([c for c in chunks if c] or [b""])
    assert done
    assert decoded == message
    assert rest == tail
