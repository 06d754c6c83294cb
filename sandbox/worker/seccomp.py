"""The system-call filter every job child installs just before the agent's program runs (both backends).

A data-science program needs files, memory, threads, processes, pipes and UNIX sockets. It never needs to make
namespaces or mounts, trace or read other processes, use the kernel keyring, io_uring, BPF, perf events,
userfaultfd, System V IPC or POSIX message queues (kernel objects that outlive a process and so could carry labels
from one fold to the next), anonymous memory files (memory no limit counts), or IP and netlink sockets (the only
network is loopback, its connection table outlives a fold, and netlink error replies queue gigabytes that no memory
cgroup counts). Nor does it need to see or steer the host's page cache, which every run shares: `fadvise` (drops a
file's cached pages), `mincore` and `cachestat` (report which pages are cached), reads and writes with RWF_NOWAIT
and Linux AIO (fail instead of blocking when a page is not cached), `madvise` page-out advice, inotify (shows which
files others open), or `mlock` (moves a host-wide counter in /proc/vmstat by one per call). Those calls fail with
EPERM (`clone3` with ENOSYS, so the C library falls back to `clone`, whose namespace flags are checked); everything
else is allowed, so the filter costs nothing measurable (the kernel caches "allowed" for calls whose verdict does
not depend on arguments).

The filter is compiled once, when the worker starts (`compile_filter`, through libseccomp: Debian's `seccomp`
binding when importable, else `pyseccomp`, the same API over ctypes, pinned in the sandbox requirements), and each
child loads the compiled program with one `prctl` (`install`): no child pays for compiling. Stdlib only apart from
the binding, because it runs inside the sandbox.
"""

from __future__ import annotations

import ctypes
import errno
import os

# Each fails with EPERM. Names unknown to the running architecture are skipped.
DENIED = (
    # new namespaces and mounts (unshare(CLONE_NEWUSER) gives full capabilities in the new namespace)
    "unshare", "setns", "mount", "umount", "umount2", "pivot_root", "chroot", "mount_setattr", "open_tree",
    "move_mount", "fsopen", "fsconfig", "fsmount", "fspick",
    # other processes' memory and file descriptors
    "ptrace", "process_vm_readv", "process_vm_writev", "process_madvise", "kcmp", "pidfd_getfd",
    # kernel keyring: user keyrings outlive every process of their uid
    "keyctl", "add_key", "request_key",
    # kernel objects that outlive the process, or memory that no limit counts
    "shmget", "shmat", "shmdt", "shmctl", "msgget", "msgsnd", "msgrcv", "msgctl", "semget", "semop",
    "semtimedop", "semctl", "mq_open", "mq_unlink", "mq_timedsend", "mq_timedreceive", "mq_notify",
    "mq_getsetattr", "memfd_create", "memfd_secret",
    # large kernel attack surface nothing here uses
    "io_uring_setup", "io_uring_enter", "io_uring_register", "bpf", "perf_event_open", "userfaultfd",
    "fanotify_init", "name_to_handle_at", "open_by_handle_at", "lookup_dcookie", "uselib", "personality",
    "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module", "reboot", "swapon",
    "swapoff", "acct", "quotactl", "quotactl_fd", "syslog", "vhangup", "iopl", "ioperm", "settimeofday",
    "clock_settime", "clock_adjtime", "adjtimex", "sethostname", "setdomainname", "_sysctl", "sysfs", "ustat",
    "nfsservctl", "create_module", "get_kernel_syms", "query_module",
    # the host's page cache and file activity, shared with every other run: marks set in one fold, read in the next
    "fadvise64", "fadvise64_64", "arm_fadvise64_64", "mincore", "cachestat", "inotify_init", "inotify_init1",
    "inotify_add_watch", "io_setup", "io_submit",
    # a host-wide counter (/proc/vmstat unevictable_pgs_mlocked) that each call moves by one
    "mlock", "mlock2", "mlockall", "munlock", "munlockall",
)
# Calls denied by number where libseccomp may not know the name yet (the same number on every architecture).
DENIED_NUMBERS = {"cachestat": 451}
RWF_NOWAIT = 0x00000008  # preadv2/pwritev2 flag (argument 5): report "not cached" instead of reading from disk
MADV_COLD, MADV_PAGEOUT = 20, 21  # madvise advice (argument 2) that pushes a file's pages out of memory
# clone(2) flags that make namespaces (CLONE_NEWTIME shares its bit with CSIGNAL in clone, so unshare-only).
NAMESPACE_FLAGS = (0x00020000, 0x02000000, 0x04000000, 0x08000000, 0x10000000, 0x20000000, 0x40000000)
AF_UNIX, AF_MAX = 1, 64  # the only socket family allowed: netlink replies queue in memory no cgroup counts

_PR_SET_NO_NEW_PRIVS, _PR_SET_SECCOMP, _SECCOMP_MODE_FILTER = 38, 22, 2
_SOCK_FILTER_SIZE = 8  # struct sock_filter: u16 code, u8 jt, u8 jf, u32 k


class FilterUnavailable(RuntimeError):
    """libseccomp or its binding is missing, or the kernel refused the filter."""


def _binding():
    try:
        import seccomp  # Debian's python3-seccomp, the binding libseccomp ships
    except ImportError:
        try:
            import pyseccomp as seccomp  # same API over ctypes (PyPI), pinned in sandbox/image/requirements.txt
        except (ImportError, RuntimeError) as exc:  # RuntimeError: libseccomp.so.2 itself is missing
            raise FilterUnavailable(f"no libseccomp binding can be imported ({exc}); install libseccomp2 and "
                                    "the pinned sandbox requirements") from None
    return seccomp


def compile_filter() -> bytes:
    """The filter as a classic BPF program (raw `struct sock_filter` array) for the running architecture."""
    seccomp = _binding()
    deny = seccomp.ERRNO(errno.EPERM)
    flt = seccomp.SyscallFilter(defaction=seccomp.ALLOW)
    # A call made through another ABI (i386 on x86_64) kills the process rather than slipping past the rules.
    flt.set_attr(seccomp.Attr.ACT_BADARCH, seccomp.KILL_PROCESS if hasattr(seccomp, "KILL_PROCESS")
                 else seccomp.KILL)
    try:
        flt.set_attr(seccomp.Attr.CTL_OPTIMIZE, 2)  # binary tree over syscall numbers (libseccomp >= 2.5)
    except (OSError, AttributeError):
        pass
    for name in DENIED:
        try:
            flt.add_rule(deny, name)
        except (OSError, ValueError, RuntimeError):
            # not a system call on this architecture, or one this libseccomp does not know by name
            if name in DENIED_NUMBERS:
                flt.add_rule(deny, DENIED_NUMBERS[name])
    for name in ("preadv2", "pwritev2"):
        flt.add_rule(deny, name, seccomp.Arg(5, seccomp.MASKED_EQ, RWF_NOWAIT, RWF_NOWAIT))
    for advice in (MADV_COLD, MADV_PAGEOUT):
        flt.add_rule(deny, "madvise", seccomp.Arg(2, seccomp.EQ, advice))
    for flag in NAMESPACE_FLAGS:
        flt.add_rule(deny, "clone", seccomp.Arg(0, seccomp.MASKED_EQ, flag, flag))
    try:
        flt.add_rule(seccomp.ERRNO(errno.ENOSYS), "clone3")  # its flags live in memory, out of the filter's reach
    except (OSError, ValueError, RuntimeError):
        pass
    for name in ("socket", "socketpair"):
        for family in range(AF_MAX):
            if family != AF_UNIX:
                flt.add_rule(deny, name, seccomp.Arg(0, seccomp.EQ, family))
        flt.add_rule(deny, name, seccomp.Arg(0, seccomp.GE, AF_MAX))
    read_fd, write_fd = os.pipe()
    try:
        with os.fdopen(write_fd, "wb", closefd=True) as sink:
            flt.export_bpf(sink)
        chunks = []
        while chunk := os.read(read_fd, 1 << 16):
            chunks.append(chunk)
    finally:
        os.close(read_fd)
    program = b"".join(chunks)
    if not program or len(program) % _SOCK_FILTER_SIZE:
        raise FilterUnavailable(f"libseccomp exported a malformed filter ({len(program)} bytes)")
    return program


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


class CompiledFilter:
    """A compiled filter ready to load: `install()` is two `prctl` calls (what each child pays)."""

    def __init__(self, program: bytes):
        self.program = program
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._libc.prctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_ulong)
        self._buffer = ctypes.create_string_buffer(program, len(program))
        self._fprog = _SockFprog(len(program) // _SOCK_FILTER_SIZE, ctypes.addressof(self._buffer))

    def install(self) -> None:
        """Load the filter into the calling process (and all it starts); raises OSError when the kernel refuses.

        Sets no_new_privs first, which an unprivileged process needs for a filter.
        """
        for args in ((_PR_SET_NO_NEW_PRIVS, 1, None, 0, 0),
                     (_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.addressof(self._fprog), 0, 0)):
            if self._libc.prctl(*args) != 0:
                code = ctypes.get_errno()
                raise OSError(code, f"prctl({args[0]}) failed: {os.strerror(code)}")


def prepare() -> CompiledFilter:
    """Compile the filter (once per worker)."""
    return CompiledFilter(compile_filter())
