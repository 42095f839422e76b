"""Kernel plumbing for the sandbox's fork server (server.py, child.py): libc calls, a lean fork, and
the isolation layers the kernel allows. Stdlib only: the server runs with `python -I`."""
from __future__ import annotations

import ctypes
import errno
import functools
import os
import struct
import sys

CLONE_NEWNS, CLONE_NEWIPC, CLONE_NEWPID, CLONE_NEWNET = 0x00020000, 0x08000000, 0x20000000, 0x40000000
CLONE_NEWUSER = 0x10000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
MNT_DETACH = 2
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_SECCOMP = 1, 4, 22
PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS = 36, 38
# The top-level directories executions see as they are (hide_files covers the rest); the Nix store
# because its programs and libraries refer to each other there
SYSTEM_DIRS = ("bin", "dev", "etc", "lib", "lib32", "lib64", "libx32", "nix", "proc", "sbin", "sys", "tmp", "usr")
# seccomp, per machine: the audit arch; the calls refused with ENOSYS (add_key, request_key, keyctl, clone3,
# bpf, perf_event_open, userfaultfd, io_uring_setup/enter/register, inotify_init(1), fanotify_init); the
# calls whose arguments it reads
SYSCALLS = {
    "x86_64": dict(arch=0xC000003E, refused=(248, 249, 250, 435, 321, 298, 323, 425, 426, 427, 253, 294, 300),
                   clone=56, unshare=272, flock=73, fcntl=72, socket=41),
    "aarch64": dict(arch=0xC00000B7, refused=(217, 218, 219, 435, 280, 241, 282, 425, 426, 427, 26, 262),
                    clone=220, unshare=97, flock=32, fcntl=25, socket=198)}
F_LOCKS, F_NOTIFY, AF_UNIX = (6, 7, 37, 38), 1026, 1  # F_SETLK, F_SETLKW, F_OFD_SETLK, F_OFD_SETLKW

_libc = ctypes.CDLL(None, use_errno=True)
_str, _int, _ulong = ctypes.c_char_p, ctypes.c_int, ctypes.c_ulong
for _name, _args in (("unshare", [_int]), ("setns", [_int, _int]), ("umount2", [_str, _int]),
                     ("mount", [_str, _str, _str, _ulong, _str]), ("prctl", [_int] + [_ulong] * 4),
                     ("madvise", [ctypes.c_void_p, ctypes.c_size_t, _int])):
    getattr(_libc, _name).argtypes = _args  # also checks the argument count
_pyfork = ctypes.PyDLL(None, use_errno=True).fork  # PyDLL: called with the GIL held


def libc(name: str, *args) -> int:
    """Call a libc function that fails with -1 and errno (os.unshare and os.setns need 3.12)."""
    ret = getattr(_libc, name)(*(a.encode() if isinstance(a, str) else a for a in args))
    if ret == -1:
        err = ctypes.get_errno()
        raise OSError(err, f"{name}{args}: {os.strerror(err)}")
    return ret


def prctl(option: int, arg: int) -> None:
    libc("prctl", option, arg, 0, 0, 0)  # unused arguments must be 0


def fork() -> int:
    """fork(2) without os.fork's after-fork work (locks, at-fork hooks), which dirties some 200 shared
    pages (0.7 ms). Only for a single-threaded process; the slot init reseeds `random` before each fork."""
    pid = _pyfork()
    if pid < 0:
        raise OSError(ctypes.get_errno(), "fork failed")
    return pid


def install_seccomp() -> None:
    """A seccomp filter, for this process and all it forks (needs no_new_privs). ENOSYS for every syscall of
    another ABI (i386, x32) and for:
    - the key calls: keyrings outlive processes (a uid's lives as long as the kernel, the session
      keyring comes from the client);
    - bpf, perf_event_open, userfaultfd and io_uring: kernel attack surface no Python program needs;
    - inotify and fanotify: they report reads of files every slot and the host share (/dev/null, the
      system's files), a signal between executions; fcntl's dnotify (F_NOTIFY) gets EINVAL, as in a
      kernel built without it;
    - clone3, whose flags a filter cannot read (libc then falls back to clone).
    EPERM for clone and unshare with CLONE_NEWUSER: in a user namespace of its own, code holds every
    capability, and with them the kernel's namespaced attack surface. EAFNOSUPPORT for sockets other than
    AF_UNIX (no interface is up anyway): a datagram counts in the slot's network namespace, which outlives
    the execution, and netlink numbers its sockets from a host-wide counter. flock and fcntl's lock
    commands return 0 and lock nothing: every lock is on an inode that other slots and the host can lock
    too (a system file, the one inode all eventfds share), and /proc/locks lists it host-wide. One process
    per locked file (sqlite3 on a file in /tmp) sees no difference; processes of one execution can no
    longer exclude each other with locks."""
    if os.uname().machine not in SYSCALLS:
        raise OSError(errno.ENOSYS, f"no syscall table for {os.uname().machine}")
    nr = SYSCALLS[os.uname().machine]
    ld, jeq, jge, jset, ret = 0x20, 0x15, 0x35, 0x45, 0x06  # BPF_LD|W|ABS, BPF_JMP|JEQ|K, |JGE|K, |JSET|K; RET|K
    allow, fail = 0x7FFF0000, 0x00050000  # SECCOMP_RET_ALLOW; SECCOMP_RET_ERRNO | errno (0: success, no call)
    # (code, k, label jumped to when true, when false) or a label; seccomp_data: nr at 0, arch at 4, the low
    # 32 bits of args[0] at 16 and of args[1] at 24 (both machines are little-endian)
    prog = [(ld, 4), (jeq, nr["arch"], None, "nosys"), (ld, 0), (jge, 0x40000000, "nosys"),
            *[(jeq, n, "nosys") for n in nr["refused"]], (jeq, nr["flock"], "pretend"),
            (jeq, nr["clone"], "clone"), (jeq, nr["unshare"], "clone"), (jeq, nr["fcntl"], "fcntl"),
            (jeq, nr["socket"], "socket"), (ret, allow),
            "clone", (ld, 16), (jset, CLONE_NEWUSER, "perm"), (ret, allow),
            "fcntl", (ld, 24), *[(jeq, cmd, "pretend") for cmd in F_LOCKS], (jeq, F_NOTIFY, "inval"), (ret, allow),
            "socket", (ld, 16), (jeq, AF_UNIX, None, "family"), (ret, allow),
            "perm", (ret, fail | errno.EPERM), "nosys", (ret, fail | errno.ENOSYS), "pretend", (ret, fail),
            "inval", (ret, fail | errno.EINVAL), "family", (ret, fail | errno.EAFNOSUPPORT)]
    at, insns = {}, []
    for item in prog:  # a label names the index of the instruction after it
        if isinstance(item, str):
            at[item] = len(insns)
        else:
            insns.append(item)
    for i, (code, k, *labels) in enumerate(insns):
        jt, jf = (at[label] - i - 1 if label else 0 for label in (*labels, None, None)[:2])  # from the next
        insns[i] = (code, jt, jf, k)
    # struct sock_filter {u16 code; u8 jt, jf; u32 k}[]; struct sock_fprog {unsigned short len; filter *}
    buf = ctypes.create_string_buffer(b"".join(struct.pack("=HBBI", *insn) for insn in insns))
    fprog = ctypes.create_string_buffer(struct.pack("@HP", len(insns), ctypes.addressof(buf)))
    libc("prctl", PR_SET_SECCOMP, 2, ctypes.addressof(fprog), 0, 0)  # 2: SECCOMP_MODE_FILTER


def setup_isolation(cfg: dict) -> dict:
    """Enable each shared layer the kernel allows (a read-only root: a per-mount flag in a private mount
    namespace, the host's stays writable), and probe the per-execution ones in a child."""
    iso = dict(uid=False, net_ns=False, mount_ns=False, hidden_files=False, readonly_root=False, pid_ns=False,
               seccomp=False)
    try_call(lambda: prctl(PR_SET_NO_NEW_PRIVS, 1))  # inherited by every execution: no setuid gains
    iso["seccomp"] = try_call(install_seccomp)
    if os.geteuid() != 0:
        return iso
    iso["uid"] = probe(lambda: (os.setgid(cfg["uid_base"]), os.setuid(cfg["uid_base"])))
    if not cfg["namespaces"]:
        return iso
    iso["net_ns"] = try_call(lambda: libc("unshare", CLONE_NEWNET))  # each slot also gets its own
    private = lambda: libc("mount", None, "/", None, MS_REC | MS_PRIVATE, None)  # noqa: E731
    if try_call(lambda: (libc("unshare", CLONE_NEWNS), private())):  # our mounts never reach the host
        tmpfs = lambda: libc("mount", "tmpfs", "/tmp", "tmpfs", 0, None)  # noqa: E731
        iso["mount_ns"] = probe(lambda: (libc("unshare", CLONE_NEWNS | CLONE_NEWIPC), tmpfs()))
        if iso["mount_ns"]:  # without a tmpfs per slot, workdirs need a writable /tmp
            iso["hidden_files"] = hide_files(interpreter_dirs())
            readonly = lambda: libc("mount", None, "/", None, MS_REMOUNT | MS_BIND | MS_RDONLY, None)  # noqa: E731
            iso["readonly_root"] = try_call(readonly)
    if try_call(lambda: libc("unshare", CLONE_NEWPID)):
        own = os.open(f"/proc/{os.getpid()}/ns/pid", os.O_RDONLY)
        iso["pid_ns"] = probe(lambda: (os.getpid() == 1 or os._exit(1), restart_pid_counter()))
        libc("setns", own, CLONE_NEWPID)
        os.close(own)
    return iso


@functools.cache
def interpreter_dirs() -> tuple[str, ...]:
    """The real paths of the interpreter's directories (sys.path, the prefixes), none inside another;
    found once in the server, before it forks the slot inits that remount /tmp with them."""
    real = {os.path.realpath(p) for p in (*sys.path, sys.prefix, sys.base_prefix) if os.path.isdir(p)}
    return tuple(sorted(p for p in real if not any(p.startswith(q + "/") for q in real)))


def fresh_tmpfs(opts: str) -> None:
    """Mount empty tmpfs on /tmp and /dev/shm, bind-mounting back the interpreter's directories under /tmp
    (a venv there)."""
    keep = [p for p in interpreter_dirs() if p.startswith("/tmp/")]
    if keep:  # stage the original /tmp on /dev/shm, which gets its own tmpfs next
        libc("mount", "/tmp", "/dev/shm", None, MS_BIND | MS_REC, None)
    libc("mount", "tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, opts)
    umask = os.umask(0o022)  # every directory on the way is 755, so executions cannot write there
    for path in keep:
        os.makedirs(path, mode=0o755, exist_ok=True)
        bind_readonly("/dev/shm" + path[4:], path)
    os.umask(umask)
    if keep:
        libc("umount2", "/dev/shm", MNT_DETACH)
    libc("mount", "tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, opts)


def drop_tmpfs() -> None:
    """Detach what fresh_tmpfs mounted; the files go with the last reference. umount waits for an RCU grace
    period (ms on a busy machine): do it where nobody waits."""
    libc("umount2", "/tmp", MNT_DETACH)
    libc("umount2", "/dev/shm", MNT_DETACH)


def restart_pid_counter() -> None:
    """Number the next process of this PID namespace 2, as in a new one (once all but its init are reaped)."""
    fd = os.open("/proc/sys/kernel/ns_last_pid", os.O_WRONLY)
    try:
        os.write(fd, b"1")
    finally:
        os.close(fd)


def hide_files(keep: tuple[str, ...]) -> bool:
    """Cover with an empty tmpfs every top-level directory outside SYSTEM_DIRS, and each directory closed
    to the slot uids on the way to a `keep` directory (the interpreter's), then bind back exactly the
    `keep` directories: code reads neither the project, its task data and answers, nor home directories.
    /dev/pts too: the host's ptys are numbered in one instance for every process, so executions get none
    (opening /dev/ptmx fails with ENODEV). False when a directory could not be covered (it stays as it was)."""
    keep = [p for p in keep if not p.startswith("/tmp/")]  # /tmp: fresh_tmpfs binds those
    covers: dict[str, list[str]] = {entry.path: [] for entry in os.scandir("/") if entry.path not in keep
                                    and entry.is_dir(follow_symlinks=False) and entry.name not in SYSTEM_DIRS}
    if os.path.isdir("/dev/pts"):
        covers["/dev/pts"] = []
    for path in keep:
        parts = path.split("/")
        ancestors = ("/".join(parts[:i]) for i in range(2, len(parts)))
        cover = next((a for a in ancestors if a in covers or not os.stat(a).st_mode & 0o001), None)
        if cover is not None:
            covers.setdefault(cover, []).append(path)
    umask, hidden = os.umask(0o022), True  # every directory on the way is 755: executions cannot write there
    for cover, paths in covers.items():
        try:
            libc("mount", cover, "/dev/shm", None, MS_BIND | MS_REC, None)  # stage the original
        except OSError:
            hidden = False
            continue
        try:
            libc("mount", "tmpfs", cover, "tmpfs", MS_NOSUID | MS_NODEV, "size=64k,mode=755")
            try:
                for path in paths:
                    os.makedirs(path, exist_ok=True)
                    bind_readonly("/dev/shm" + path[len(cover):], path)
            except OSError:  # uncover it again: the interpreter must stay reachable
                libc("umount2", cover, MNT_DETACH)
                raise
        except OSError:
            hidden = False
        finally:
            libc("umount2", "/dev/shm", MNT_DETACH)
    os.umask(umask)
    return hidden


def bind_readonly(source: str, target: str) -> None:
    """Bind `source` (and the mounts below it) on `target`, read-only at the top: the read-only root does
    not reach a bind mount."""
    libc("mount", source, target, None, MS_BIND | MS_REC, None)
    libc("mount", None, target, None, MS_REMOUNT | MS_BIND | MS_RDONLY, None)


def huge_pages() -> None:
    """Back the preloaded heap (~50 MB) with 2 MB pages: each fork copies ~25 page-directory entries, not
    ~13,000 page-table entries (1 ms less CPU). Linux >= 5.8 only, where a child's write copies 4 KB, not 2 MB."""
    release = tuple(int(x) for x in os.uname().release.split("-")[0].split(".")[:2] if x.isdigit())
    if release < (5, 8):
        return
    huge = 2 << 20
    with open("/proc/self/maps") as f:
        regions = [line.split() for line in f]
    for fields in regions:  # the brk heap and anonymous mappings (obmalloc arenas) that are writable
        if not fields[1].startswith("rw") or (len(fields) > 5 and fields[5] != "[heap]"):
            continue
        lo, hi = (int(x, 16) for x in fields[0].split("-"))
        lo, hi = -(-lo // huge) * huge, hi // huge * huge
        if hi > lo:
            _libc.madvise(lo, hi - lo, 14)  # MADV_HUGEPAGE: eligible where THP is "madvise"
            _libc.madvise(lo, hi - lo, 25)  # MADV_COLLAPSE (Linux 6.1): now; fails harmlessly


def try_call(fn) -> bool:
    try:
        fn()
        return True
    except OSError:
        return False


def probe(fn) -> bool:
    """Run fn in a child; True when it returns without raising."""
    pid = os.fork()
    if pid == 0:
        os._exit(0 if try_call(fn) else 1)
    return os.waitpid(pid, 0)[1] == 0
