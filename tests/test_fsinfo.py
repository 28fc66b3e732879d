"""Which file systems need a cache flush after syncfs (mta/fsinfo.py)."""
import pytest

from mta.fsinfo import describe, mount_type, needs_flush, syncfs_needs_flush

MOUNTINFO = """\
22 27 0:21 / /proc rw,relatime - proc proc rw
25 24 0:23 / /dev/shm rw,relatime shared:3 - tmpfs tmpfs rw,size=24683656k
27 1 254:0 / / rw,relatime shared:1 master:7 - ext4 /dev/vda rw,discard
31 27 8:17 /srv /var/spool rw,noatime - xfs /dev/sdb1 rw,attr2,inode64
35 27 8:33 / /mnt/odd rw - 
"""


@pytest.mark.parametrize("device, expected", [
    ("254:0", "ext4"),      # two optional fields before the separator
    ("0:23", "tmpfs"),      # one optional field
    ("0:21", "proc"),       # none
    ("8:17", "xfs"),        # a bind mount of a subdirectory
    ("8:33", None),         # a line cut short after the separator
    ("9:9", None),          # not mounted
])
def test_mount_type(device, expected):
    assert mount_type(MOUNTINFO, device) == expected


def test_mount_type_with_dashes_in_paths():
    line = "40 27 7:1 /- /mnt/- rw - btrfs /dev/loop1 rw\n"
    assert mount_type(line, "7:1") == "btrfs"


@pytest.mark.parametrize("fstype, has_journal, expected", [
    ("ext4", False, True),    # the development VM: syncfs flushes before its last metadata writes
    ("ext4", True, False),    # the journal commit covers them
    ("ext3", True, False),
    ("ext2", False, True),
    ("xfs", False, False),
    ("btrfs", False, False),
    ("tmpfs", False, True),   # not known to be safe: the flush is cheap
    ("f2fs", False, True),
    (None, False, True),      # the mount could not be found
])
def test_needs_flush(fstype, has_journal, expected):
    assert needs_flush(fstype, has_journal) is expected


@pytest.mark.parametrize("fstype, has_journal, text", [
    ("ext4", False, "ext4 without a journal"),
    ("ext3", True, "ext3 with a journal"),
    ("tmpfs", False, "tmpfs"),
    (None, False, "an unknown file system"),
])
def test_describe(fstype, has_journal, text):
    assert describe(fstype, has_journal) == text


def test_the_main_log_says_when_each_syncfs_gets_a_flush(mta):
    """An operator learns at start what this machine's spool costs; the
    line is there exactly when the committer adds the flush."""
    server = mta(workers=1)
    said = "each batch's syncfs is followed by a directory fsync" in server.log()
    assert said == syncfs_needs_flush(server.input)
