"""Writing into shared memory that other processes read while it changes.

`struct.Struct.pack_into` clears its target before it packs the fields, so
a reader in another process can catch those bytes all zero: a sequence
number of 0 looks even ("not being written"), a total of 0 looks like no
connections.  `store` packs first and writes the bytes with one copy: a
reader sees old or new bytes, never zeros in between.
"""
from __future__ import annotations

import mmap
import struct


def store(memory: mmap.mmap, offset: int, layout: struct.Struct, *values) -> None:
    memory[offset:offset + layout.size] = layout.pack(*values)
