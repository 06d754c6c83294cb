"""The job children's system-call filter (sandbox/worker/seccomp.py), loaded into a forked child of the test."""

from __future__ import annotations

import json
import os
import platform
import socket
import threading

import pytest

from sandbox.worker import seccomp

pytestmark = pytest.mark.skipif(platform.machine() != "x86_64", reason="system-call numbers below are x86_64")


def _in_filtered_child(probe) -> dict:
    compiled = seccomp.prepare()
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            compiled.install()
            result = probe()
        except BaseException as exc:  # reported to the parent
            result = {"error": repr(exc)}
        os.write(write_fd, json.dumps(result).encode())
        os._exit(0)
    os.close(write_fd)
    data = os.read(read_fd, 1 << 16)
    os.close(read_fd)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    return json.loads(data)


def _errno_of(nr: int, *args) -> int:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    return 0 if libc.syscall(nr, *args) >= 0 else ctypes.get_errno()


def test_filter_denies_what_a_program_never_needs():
    def probe():
        import errno

        denied = {"unshare(CLONE_NEWUSER)": _errno_of(272, 0x10000000), "io_uring_setup": _errno_of(425, 8, None),
                  "keyctl": _errno_of(250, 0, -3, 1), "shmget": _errno_of(29, 0, 4096, 0o1000 | 0o600),
                  "memfd_create": _errno_of(319, b"x", 0), "ptrace": _errno_of(101, 0, 0, 0, 0),
                  "clone3": _errno_of(435, 0, 0)}
        try:
            socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            denied["socket(AF_INET)"] = 0
        except PermissionError:
            denied["socket(AF_INET)"] = errno.EPERM
        return {name: errno.errorcode.get(code, code) for name, code in denied.items()}

    found = _in_filtered_child(probe)
    assert found.pop("clone3") == "ENOSYS"  # the C library falls back to clone, whose flags are checked
    assert found == {name: "EPERM" for name in found}


def test_filter_allows_what_a_program_needs():
    def probe():
        left, right = socket.socketpair(socket.AF_UNIX)
        left.sendall(b"x")
        got = right.recv(1)
        pid = os.fork()
        if pid == 0:
            os._exit(7)
        _, status = os.waitpid(pid, 0)
        box = []
        thread = threading.Thread(target=lambda: box.append(1))
        thread.start()
        thread.join()
        return {"unix": got.decode(), "fork": os.waitstatus_to_exitcode(status), "thread": box}

    assert _in_filtered_child(probe) == {"unix": "x", "fork": 7, "thread": [1]}
