"""Cost of mta.proxy_protocol.parse() per header, and a fuzz mode.

Run from the repository root:
    .venv/bin/python -m bench.proxy_parser                  # microseconds per header
    .venv/bin/python -m bench.proxy_parser --fuzz 1000000   # N random/mutated inputs

The fuzz mode feeds parse() random bytes, valid headers built at random,
truncations of them and mutated copies, and counts the outcomes.  Any
exception other than ProxyProtocolError is a bug: it is printed with its
input and the exit status is 1.
"""

from __future__ import annotations

import argparse
import random
import socket
import sys
import time
import timeit
import traceback
from collections import Counter
from pathlib import Path

if not __package__:  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mta.proxy_protocol import (  # noqa: E402
    V2_SIGNATURE,
    ProxyProtocolError,
    build_ssl_tlv,
    build_v1,
    build_v2,
    parse,
)

SSL_TLV = build_ssl_tlv(
    0x07,
    0,
    [
        (0x21, b"TLSv1.3"),
        (0x22, b"client.example.com"),
        (0x23, b"TLS_AES_256_GCM_SHA384"),
        (0x24, b"RSA-SHA256"),
        (0x25, b"RSA2048"),
    ],
)
INET6_TLVS = [(0x02, b"mx.example.com"), (0x05, b"0123456789abcdef0123456789abcdef"), (0x20, SSL_TLV)]

CASES = {
    "v1 TCP4": build_v1("TCP4", "192.168.100.200", "10.0.0.1", 56324, 25),
    "v1 TCP6": build_v1("TCP6", "2001:db8:85a3::8a2e:370:7334", "2001:db8::1", 56324, 25),
    "v1 UNKNOWN": build_v1("UNKNOWN", None, None, None, None),
    "v2 INET minimal": build_v2("PROXY", "INET", "192.168.100.200", "10.0.0.1", 56324, 25),
    "v2 INET6 + TLVs, no CRC": build_v2("PROXY", "INET6", "2001:db8::1", "2001:db8::2", 56324, 25, INET6_TLVS),
    "v2 INET6 + TLVs + CRC32C": build_v2(
        "PROXY", "INET6", "2001:db8::1", "2001:db8::2", 56324, 25, INET6_TLVS, crc=True
    ),
}


def microseconds_per_call(data: bytes, number: int) -> float:
    """Best of five runs, so that other load on the machine counts as little as possible."""
    timer = timeit.Timer(lambda: parse(data))
    return min(timer.repeat(repeat=5, number=number)) / number * 1e6


def run_timings(number: int) -> None:
    print(f"parse() cost per header (best of 5 x {number} calls)")
    for name, data in CASES.items():
        assert parse(data) is not None, name
        print(f"  {name:26} {len(data):4d} bytes  {microseconds_per_call(data, number):7.2f} us")


# ------------------------------------------------------------------------ fuzz

STRUCTURAL_BYTES = b"\x00\r\n :.0\xff\x01\x02\x03\x20\x21"
FREE_TLV_TYPES = [0x04, 0x30, 0xE0, 0xFF]  # may repeat, not interpreted


def random_ipv6(rng: random.Random) -> str:
    if rng.random() < 0.2:
        return "::ffff:" + socket.inet_ntoa(rng.getrandbits(32).to_bytes(4, "big"))
    return socket.inet_ntop(socket.AF_INET6, rng.getrandbits(128).to_bytes(16, "big"))


def random_ipv4(rng: random.Random) -> str:
    return socket.inet_ntoa(rng.getrandbits(32).to_bytes(4, "big"))


def random_valid_header(rng: random.Random) -> bytes:
    if rng.random() < 0.4:
        family = rng.choice(["TCP4", "TCP6", "UNKNOWN"])
        if family == "UNKNOWN":
            return build_v1(family, None, None, None, None)
        address = random_ipv4 if family == "TCP4" else random_ipv6
        return build_v1(family, address(rng), address(rng), rng.randrange(65536), rng.randrange(65536))
    return random_v2_header(rng)


def random_v2_header(rng: random.Random) -> bytes:
    family = rng.choice(["INET", "INET6", "UNIX", "UNSPEC"])
    source = destination = sport = dport = None
    if family in ("INET", "INET6"):
        address = random_ipv4 if family == "INET" else random_ipv6
        source, destination = address(rng), address(rng)
        sport, dport = rng.randrange(65536), rng.randrange(65536)
    elif family == "UNIX":
        source, destination = "/run/a.sock", "@abstract"
    tlvs = [(rng.choice(FREE_TLV_TYPES), rng.randbytes(rng.randrange(12))) for _ in range(rng.randrange(3))]
    if rng.random() < 0.5:
        tlvs.append((0x02, b"mx.example.org"))
    if rng.random() < 0.5:
        tlvs.append((0x05, rng.randbytes(rng.randrange(129))))
    if rng.random() < 0.5:
        tlvs.append((0x20, SSL_TLV))
    return build_v2(
        rng.choice(["PROXY", "LOCAL"]),
        family,
        source,
        destination,
        sport,
        dport,
        tlvs,
        crc=rng.random() < 0.5,
        transport=rng.choice(["STREAM", "DGRAM"]),
    )


def mutate(rng: random.Random, data: bytes) -> bytes:
    mutable = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        position = rng.randrange(len(mutable) + 1)
        action = rng.randrange(4)
        if action == 0 or position == len(mutable):
            mutable[position:position] = rng.randbytes(rng.randint(1, 3))
        elif action == 1:
            del mutable[position]
        elif action == 2:
            mutable[position] ^= 1 << rng.randrange(8)
        else:
            mutable[position] = rng.choice(STRUCTURAL_BYTES)
    return bytes(mutable)


def random_input(rng: random.Random) -> tuple[str, bytes]:
    kind = rng.randrange(6)
    if kind == 0:
        return "random", rng.randbytes(rng.randrange(120))
    if kind == 1:
        return "signature+random", V2_SIGNATURE + rng.randbytes(rng.randrange(60))
    if kind == 2:
        return "PROXY+random", b"PROXY " + rng.randbytes(rng.randrange(110))
    valid = random_valid_header(rng)
    if kind == 3:
        return "valid+tail", valid + rng.randbytes(rng.randrange(8))
    if kind == 4:
        return "truncated", valid[: rng.randrange(len(valid))]
    return "mutated", mutate(rng, valid)


def run_fuzz(count: int, seed: int) -> int:
    rng = random.Random(seed)
    outcomes: Counter[str] = Counter()
    kinds: Counter[str] = Counter()
    foreign = 0
    started = time.perf_counter()
    for _ in range(count):
        kind, data = random_input(rng)
        kinds[kind] += 1
        try:
            result = parse(data)
        except ProxyProtocolError:
            outcomes["refused (ProxyProtocolError)"] += 1
            continue
        except Exception:  # the one thing this mode exists to find
            foreign += 1
            if foreign <= 5:
                print(f"FOREIGN EXCEPTION for {data!r}:\n{traceback.format_exc()}", file=sys.stderr)
            continue
        if result is None:
            outcomes["incomplete (None)"] += 1
        elif 0 < result[1] <= len(data):
            outcomes["complete header"] += 1
        else:
            foreign += 1
            print(f"BAD CONSUMED COUNT {result[1]} for {data!r}", file=sys.stderr)
    elapsed = time.perf_counter() - started
    print(f"fuzz: {count} inputs (seed {seed}) in {elapsed:.1f} s, {count / elapsed:,.0f} inputs/s")
    print("  inputs:   " + ", ".join(f"{name} {n}" for name, n in sorted(kinds.items())))
    print("  outcomes: " + ", ".join(f"{name} {n}" for name, n in sorted(outcomes.items())))
    print(f"  foreign exceptions or bad results: {foreign}")
    return 1 if foreign else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fuzz", type=int, metavar="N", help="run N random/mutated inputs through parse()")
    parser.add_argument("--seed", type=int, default=1, help="random seed for --fuzz (default 1)")
    parser.add_argument("--number", type=int, default=20000, help="calls per timing run (default 20000)")
    arguments = parser.parse_args()
    if arguments.fuzz is not None:
        return run_fuzz(arguments.fuzz, arguments.seed)
    run_timings(arguments.number)
    return 0


if __name__ == "__main__":
    sys.exit(main())
