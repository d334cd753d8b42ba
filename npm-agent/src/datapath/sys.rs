//! The only `unsafe` code of the agent: raw syscalls aya does not wrap the way we need.
#![allow(unsafe_code)]

use std::{io, os::fd::AsRawFd as _, os::fd::BorrowedFd};

/// `BPF_PROG_TEST_RUN` command number (`enum bpf_cmd`, include/uapi/linux/bpf.h).
const BPF_PROG_TEST_RUN: libc::c_long = 10;

/// The `test` member of `union bpf_attr` (include/uapi/linux/bpf.h), up to `batch_size`.
/// The kernel accepts a shorter attr than its own union and zero-fills the rest.
#[repr(C)]
#[derive(Default)]
#[allow(dead_code, reason = "fields are read by the kernel")]
struct TestRunAttr {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
    ctx_size_in: u32,
    ctx_size_out: u32,
    ctx_in: u64,
    ctx_out: u64,
    flags: u32,
    cpu: u32,
    batch_size: u32,
    _pad: u32,
}
const _: () = assert!(size_of::<TestRunAttr>() == 80);

/// The head of `struct __sk_buff`, through `tc_index`. `bpf_prog_test_run_skb` accepts a
/// shorter context and requires every field but `mark`, `priority`, `ingress_ifindex`,
/// `ifindex` (and a few later ones) to be zero.
#[repr(C)]
#[derive(Default)]
#[allow(dead_code, reason = "fields are read by the kernel")]
struct SkBuffCtx {
    len: u32,
    pkt_type: u32,
    mark: u32,
    /// `queue_mapping, protocol, vlan_present, vlan_tci, vlan_proto, priority,
    /// ingress_ifindex`: all zero.
    head: [u32; 7],
    ifindex: u32,
    tc_index: u32,
}
const _: () = assert!(size_of::<SkBuffCtx>() == 48);

/// What one `BPF_PROG_TEST_RUN` returned.
pub(crate) struct RawTestRun {
    pub(crate) retval: u32,
    pub(crate) duration_ns: u32,
    pub(crate) data_out: Vec<u8>,
    /// `skb->mark` after the last run.
    pub(crate) mark_out: u32,
}

/// Runs the sched_cls program `prog` on `packet` (starting with its Ethernet header)
/// `repeat` times. `ifindex` becomes `skb->dev`; the kernel requires it to exist in the
/// calling thread's network namespace (1, `lo`, always does). `mark` is `skb->mark` on entry;
/// the mark after the run is returned.
pub(crate) fn prog_test_run(
    prog: BorrowedFd<'_>,
    packet: &[u8],
    ifindex: u32,
    mark: u32,
    repeat: u32,
) -> io::Result<RawTestRun> {
    let too_big = |_| io::Error::from_raw_os_error(libc::E2BIG);
    // Room for programs that grow the packet; the kernel reports ENOSPC if it is too small.
    let mut out = vec![0u8; packet.len() + 256];
    let ctx = SkBuffCtx {
        ifindex,
        mark,
        ..SkBuffCtx::default()
    };
    // The kernel writes its whole `struct __sk_buff` back (ENOSPC if the buffer is smaller):
    // room for it (192 bytes today) with margin; `mark` is the third u32.
    let mut ctx_out = [0u32; 64];
    let mut attr = TestRunAttr {
        prog_fd: u32::try_from(prog.as_raw_fd())
            .map_err(|_| io::Error::from_raw_os_error(libc::EBADF))?,
        data_size_in: u32::try_from(packet.len()).map_err(too_big)?,
        data_size_out: u32::try_from(out.len()).map_err(too_big)?,
        data_in: packet.as_ptr() as u64,
        data_out: out.as_mut_ptr() as u64,
        repeat,
        ctx_size_in: size_of::<SkBuffCtx>() as u32,
        ctx_in: &raw const ctx as u64,
        ctx_size_out: size_of::<[u32; 64]>() as u32,
        ctx_out: &raw mut ctx_out as u64,
        ..TestRunAttr::default()
    };
    // SAFETY: `attr` is a valid, fully initialised `bpf_attr.test` of the size we pass; the
    // pointers in it reference `packet` (read, `data_size_in` bytes), `out` (written, at most
    // `data_size_out` bytes), `ctx` (read, `ctx_size_in` bytes) and `ctx_out` (written, at
    // most `ctx_size_out` bytes), all of which outlive the call. The fd is borrowed for the
    // call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_TEST_RUN,
            &raw mut attr,
            size_of::<TestRunAttr>(),
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    out.truncate(
        usize::try_from(attr.data_size_out)
            .unwrap_or(0)
            .min(out.len()),
    );
    Ok(RawTestRun {
        retval: attr.retval,
        duration_ns: attr.duration,
        data_out: out,
        mark_out: ctx_out[2],
    })
}

/// bpffs's `statfs` magic (`BPF_FS_MAGIC` in linux/magic.h).
pub(crate) const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// The type (`f_type`) of the filesystem holding `path`.
pub(crate) fn fs_type(path: &std::path::Path) -> io::Result<i64> {
    use std::os::unix::ffi::OsStrExt as _;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let mut st = std::mem::MaybeUninit::<libc::statfs>::zeroed();
    // SAFETY: `c` is NUL-terminated and `st` is a writable statfs; the call writes only it.
    let rc = unsafe { libc::statfs(c.as_ptr(), st.as_mut_ptr()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: statfs succeeded, so it filled `st` (which was zeroed before anyway).
    let st = unsafe { st.assume_init() };
    // `f_type` is i64 on x86_64 and aarch64 but narrower on some targets.
    #[allow(clippy::useless_conversion)]
    Ok(i64::from(st.f_type))
}

/// Raises RLIMIT_MEMLOCK to infinity. Kernels before 5.11 charge BPF maps against it; later
/// ones use memcg accounting, so a failure here only matters on old kernels.
pub(crate) fn raise_memlock() -> io::Result<()> {
    let lim = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: `lim` is a valid rlimit that the call only reads.
    let rc = unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &raw const lim) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The index of interface `name` in the calling thread's network namespace.
pub(crate) fn if_nametoindex(name: &std::ffi::CStr) -> io::Result<u32> {
    // SAFETY: `name` is a valid NUL-terminated string that the call only reads.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if index == 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(index)
}

/// The name of interface `index` in the calling thread's network namespace.
pub(crate) fn if_indextoname(index: u32) -> io::Result<String> {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: `buf` is IF_NAMESIZE bytes, the size the call may write (name + NUL); it
    // outlives the call.
    let ret = unsafe { libc::if_indextoname(index, buf.as_mut_ptr()) };
    if ret.is_null() {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: on success the call wrote a NUL-terminated name into `buf`.
    let name = unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) };
    Ok(name.to_string_lossy().into_owned())
}

/// `BPF_PROG_ATTACH` and `BPF_PROG_DETACH` command numbers (`enum bpf_cmd`).
const BPF_PROG_ATTACH: libc::c_long = 8;
const BPF_PROG_DETACH: libc::c_long = 9;
/// `BPF_F_REPLACE`: the attach replaces the program given by `replace_bpf_fd`.
const BPF_F_REPLACE: u32 = 1 << 2;

/// The tcx hooks (`enum bpf_attach_type`, Linux 6.6+).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum TcxHook {
    /// `BPF_TCX_INGRESS`.
    Ingress = 46,
    /// `BPF_TCX_EGRESS`.
    Egress = 47,
}

/// The attach/detach member of `union bpf_attr` (include/uapi/linux/bpf.h, Linux 6.6+).
#[repr(C)]
#[derive(Default)]
#[allow(dead_code, reason = "fields are read by the kernel")]
struct ProgAttachAttr {
    /// `target_ifindex` for tcx.
    target: u32,
    attach_bpf_fd: u32,
    attach_type: u32,
    attach_flags: u32,
    replace_bpf_fd: u32,
    relative_fd: u32,
    expected_revision: u64,
}
const _: () = assert!(size_of::<ProgAttachAttr>() == 32);

fn raw_fd(fd: BorrowedFd<'_>) -> io::Result<u32> {
    u32::try_from(fd.as_raw_fd()).map_err(|_| io::Error::from_raw_os_error(libc::EBADF))
}

fn prog_attach_cmd(cmd: libc::c_long, attr: &mut ProgAttachAttr) -> io::Result<()> {
    // SAFETY: `attr` is a valid, fully initialised attach/detach member of `bpf_attr` of the
    // size we pass; it holds no pointers, and the fds in it are borrowed for the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            std::ptr::from_mut(attr),
            size_of::<ProgAttachAttr>(),
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Attaches `prog` to tcx `hook` of interface `ifindex` without a link (`BPF_PROG_ATTACH`):
/// the attachment holds its own reference to the program and stays until it is detached or
/// the interface goes, whatever happens to this process. With `replace`, that program's
/// place is taken atomically (the kernel fails with `ENOENT` if it is not attached there);
/// without, `prog` is appended after the hook's other programs.
pub(crate) fn tcx_attach(
    ifindex: u32,
    hook: TcxHook,
    prog: BorrowedFd<'_>,
    replace: Option<BorrowedFd<'_>>,
) -> io::Result<()> {
    let mut attr = ProgAttachAttr {
        target: ifindex,
        attach_bpf_fd: raw_fd(prog)?,
        attach_type: hook as u32,
        ..ProgAttachAttr::default()
    };
    if let Some(old) = replace {
        attr.attach_flags = BPF_F_REPLACE;
        attr.replace_bpf_fd = raw_fd(old)?;
    }
    prog_attach_cmd(BPF_PROG_ATTACH, &mut attr)
}

/// Detaches `prog` from tcx `hook` of interface `ifindex` (`BPF_PROG_DETACH`; `ENOENT` if it
/// is not attached there).
pub(crate) fn tcx_detach(ifindex: u32, hook: TcxHook, prog: BorrowedFd<'_>) -> io::Result<()> {
    let mut attr = ProgAttachAttr {
        target: ifindex,
        attach_bpf_fd: raw_fd(prog)?,
        attach_type: hook as u32,
        ..ProgAttachAttr::default()
    };
    prog_attach_cmd(BPF_PROG_DETACH, &mut attr)
}

/// Every interface of the calling thread's network namespace, as (index, name), by index
/// (`if_nameindex(3)`: glibc asks rtnetlink, so it sees the namespace the thread is in, unlike
/// `/sys/class/net`, which shows the namespace sysfs was mounted in).
pub(crate) fn interfaces() -> io::Result<Vec<(u32, String)>> {
    // SAFETY: no arguments; returns a heap array terminated by a zero entry, or null on error.
    let list = unsafe { libc::if_nameindex() };
    if list.is_null() {
        return Err(io::Error::last_os_error());
    }
    let mut out = Vec::new();
    let mut at = list;
    // SAFETY: `list` is the array if_nameindex returned; every entry up to the terminating
    // one (index 0, null name) is valid and holds a NUL-terminated name, and the array is
    // freed exactly once, after the last read.
    unsafe {
        while (*at).if_index != 0 && !(*at).if_name.is_null() {
            let name = std::ffi::CStr::from_ptr((*at).if_name)
                .to_string_lossy()
                .into_owned();
            out.push(((*at).if_index, name));
            at = at.add(1);
        }
        libc::if_freenameindex(list);
    }
    out.sort();
    Ok(out)
}

/// `BPF_MAP_GET_NEXT_KEY` command number.
const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;

/// The `map_elem` member of `union bpf_attr` for `BPF_MAP_GET_NEXT_KEY`.
#[repr(C)]
#[allow(dead_code, reason = "fields are read by the kernel")]
struct MapNextKeyAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    next_key: u64,
}
const _: () = assert!(size_of::<MapNextKeyAttr>() == 24);

/// The keys of the hash, LRU hash or LPM trie map `map` (whose keys are `key_size` bytes),
/// counted with `BPF_MAP_GET_NEXT_KEY` whatever their type, walking at most `limit`.
pub(crate) fn count_keys(map: BorrowedFd<'_>, key_size: u32, limit: u32) -> io::Result<u32> {
    let size = usize::try_from(key_size).map_err(|_| io::Error::from_raw_os_error(libc::E2BIG))?;
    let mut key = vec![0u8; size];
    let mut next = vec![0u8; size];
    let mut n = 0u32;
    let mut first = true;
    while n < limit {
        let mut attr = MapNextKeyAttr {
            map_fd: raw_fd(map)?,
            _pad: 0,
            key: if first { 0 } else { key.as_ptr() as u64 },
            next_key: next.as_mut_ptr() as u64,
        };
        // SAFETY: `attr` is a valid `bpf_attr.map_elem` of the size we pass; `key` (read, or
        // null for the first key) and `next` (written) are `key_size` bytes, the map's key
        // size, and outlive the call; the fd is borrowed for it.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_GET_NEXT_KEY,
                &raw mut attr,
                size_of::<MapNextKeyAttr>(),
            )
        };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENOENT) {
                break;
            }
            return Err(e);
        }
        n += 1;
        first = false;
        std::mem::swap(&mut key, &mut next);
    }
    Ok(n)
}
