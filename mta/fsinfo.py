"""What the spool's file system does and does not guarantee after syncfs(2).

On ext2/3/4 without a journal, syncfs(2) can return before everything it
wrote is out of the disk's volatile write cache.  Linux's sync_filesystem()
writes back the files, asks the file system to flush the disk cache
(`->sync_fs(wait)`), and only *then* writes and waits for the block
device's dirty metadata buffers.  A new spool file's data is written to an
unwritten extent; when that write completes its inode is updated (the
extent converted to written) in the inode table's buffer, and that buffer
reaches the disk in the last step, after the flush.  A power cut then can
leave acknowledged files reading as zeros.  Traced on the development VM
(ext4, no journal, dioread_nolock): the inode table block of each new -D/-H
pair was written after every syncfs's cache flush.

With a journal the commit record covers those changes, so one syncfs is
enough.  Without one, the committer follows each syncfs with a directory
fsync, whose own cache flush makes what syncfs wrote durable.
"""
from __future__ import annotations

import os

EXT_FAMILY = ("ext2", "ext3", "ext4")
LOGGING_BY_DESIGN = ("xfs", "btrfs")  # their sync_fs forces a log or commits a transaction


def mount_type(mountinfo: str, device: str) -> str | None:
    """The file system type of the mount of `device` ("major:minor") in
    /proc/self/mountinfo text, or None if it is not listed.  Lines look like
    `36 35 98:0 /root /mnt rw,noatime master:1 - ext4 /dev/vda rw`."""
    for line in mountinfo.splitlines():
        fields = line.split()
        if len(fields) < 3 or fields[2] != device or "-" not in fields[6:]:
            continue
        after = fields[fields.index("-", 6) + 1:]
        if after:
            return after[0]
    return None


def needs_flush(fstype: str | None, has_journal: bool) -> bool:
    """Whether a syncfs must be followed by a cache flush of our own.

    Only file systems known to commit a journal or log in syncfs go
    without: an unneeded flush costs a fraction of a millisecond, a missing
    one can cost an acknowledged message."""
    if fstype in LOGGING_BY_DESIGN:
        return False
    if fstype in EXT_FAMILY:
        return not has_journal
    return True


def describe(fstype: str | None, has_journal: bool) -> str:
    """For the log: "ext4 without a journal", "xfs", "an unknown file system"."""
    if fstype is None:
        return "an unknown file system"
    if fstype in EXT_FAMILY:
        return fstype + (" with a journal" if has_journal else " without a journal")
    return fstype


def filesystem(path: str) -> tuple[str | None, bool]:
    """(type, has a journal) of the file system holding `path`, from
    /proc/self/mountinfo and /proc/fs/jbd2; (None, False) if unknown."""
    device = os.stat(path).st_dev
    major_minor = f"{os.major(device)}:{os.minor(device)}"
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as handle:
            fstype = mount_type(handle.read(), major_minor)
    except OSError:
        return None, False
    return fstype, fstype in EXT_FAMILY and _has_journal(major_minor)


def syncfs_needs_flush(path: str) -> bool:
    return needs_flush(*filesystem(path))


def _has_journal(major_minor: str) -> bool:
    """jbd2 lists every journal it runs in /proc/fs/jbd2/<device>-8."""
    try:
        name = os.path.basename(os.readlink(f"/sys/dev/block/{major_minor}"))
    except OSError:
        return False
    return os.path.isdir(f"/proc/fs/jbd2/{name}-8")
