//! The system calls a task may make ([`TaskSyscalls`]): with `Restricted`, a seccomp filter,
//! installed last before the program starts, refuses those a pipeline task has no use for and that
//! open the kernel's riskier parts to an unprivileged user.
//!
//! Refused with `EPERM`:
//! * namespaces: `unshare`, `setns`, and `clone` with any `CLONE_NEW*` flag. A user namespace
//!   makes a task user root over a namespace of its own, which opens kernel code written for root
//!   (many of the kernel's privilege escalations start there); nor can a task leave or re-enter
//!   the namespaces the worker gave it;
//! * mounting (`mount`, `umount2`, `pivot_root`, the `fsopen` family, `open_tree`, `move_mount`,
//!   `mount_setattr`) and `open_by_handle_at`;
//! * the kernel's keyrings (`add_key`, `request_key`, `keyctl`), which are not per task: a key
//!   would outlive its task in its uid's keyring;
//! * `bpf`, `perf_event_open`, `userfaultfd`;
//! * the machine's own business: modules, `kexec`, `reboot`, `swapon`/`swapoff`, `acct`,
//!   `quotactl`, `syslog` (the kernel's log), `lookup_dcookie`.
//!
//! Refused with `ENOSYS`, so that programs fall back to what is allowed: `clone3` (its flags are
//! out of a filter's reach; the C library then uses `clone`) and `io_uring` (a large, often
//! patched interface; programs then use plain reads and writes).
//!
//! System calls of another ABI than the worker's (32-bit calls on x86-64, whose numbers differ)
//! are refused. Filters exist for x86-64 and AArch64; elsewhere tasks run unfiltered (see
//! [`filter_supported`]).

use std::io;

use nix::libc;

use crate::TaskSyscalls;

/// `AUDIT_ARCH_*` of the architecture the worker is built for (`linux/audit.h`).
#[cfg(target_arch = "x86_64")]
const ARCH: u32 = 0xC000_003E;
#[cfg(target_arch = "aarch64")]
const ARCH: u32 = 0xC000_00B7;

/// Whether this build of the worker can filter its tasks' system calls.
pub const fn filter_supported() -> bool {
    cfg!(any(target_arch = "x86_64", target_arch = "aarch64"))
}

#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
mod program {
    use super::{ARCH, libc};

    /// Refused with `EPERM`.
    const REFUSED: [libc::c_long; 31] = [
        libc::SYS_unshare,
        libc::SYS_setns,
        libc::SYS_mount,
        libc::SYS_umount2,
        libc::SYS_pivot_root,
        libc::SYS_open_tree,
        libc::SYS_move_mount,
        libc::SYS_fsopen,
        libc::SYS_fsconfig,
        libc::SYS_fsmount,
        libc::SYS_fspick,
        libc::SYS_mount_setattr,
        libc::SYS_open_by_handle_at,
        libc::SYS_add_key,
        libc::SYS_request_key,
        libc::SYS_keyctl,
        libc::SYS_bpf,
        libc::SYS_perf_event_open,
        libc::SYS_userfaultfd,
        libc::SYS_init_module,
        libc::SYS_finit_module,
        libc::SYS_delete_module,
        libc::SYS_kexec_load,
        libc::SYS_kexec_file_load,
        libc::SYS_reboot,
        libc::SYS_swapon,
        libc::SYS_swapoff,
        libc::SYS_acct,
        libc::SYS_quotactl,
        libc::SYS_syslog,
        libc::SYS_lookup_dcookie,
    ];

    /// Refused with `ENOSYS`.
    const ABSENT: [libc::c_long; 4] =
        [libc::SYS_clone3, libc::SYS_io_uring_setup, libc::SYS_io_uring_enter, libc::SYS_io_uring_register];

    /// `clone` flags that make a namespace (all in the low 32 bits of its first argument).
    const NAMESPACES: u32 = (libc::CLONE_NEWNS
        | libc::CLONE_NEWUTS
        | libc::CLONE_NEWIPC
        | libc::CLONE_NEWUSER
        | libc::CLONE_NEWPID
        | libc::CLONE_NEWNET
        | libc::CLONE_NEWCGROUP) as u32;

    /// Offsets in `struct seccomp_data`: the call's number, its ABI, and the low half of its first
    /// argument (little-endian).
    const NR: u32 = 0;
    const ABI: u32 = 4;
    const ARG0_LOW: u32 = 16;

    /// On x86-64, the x32 ABI's calls have this bit set in their number.
    const X32_BIT: u32 = 0x4000_0000;

    fn statement(code: u32, k: u32) -> libc::sock_filter {
        libc::sock_filter { code: code as u16, jt: 0, jf: 0, k }
    }

    fn jump(code: u32, k: u32, jt: u8, jf: u8) -> libc::sock_filter {
        libc::sock_filter { code: (libc::BPF_JMP | code | libc::BPF_K) as u16, jt, jf, k }
    }

    fn load(offset: u32) -> libc::sock_filter {
        statement(libc::BPF_LD | libc::BPF_W | libc::BPF_ABS, offset)
    }

    fn ret(action: u32) -> libc::sock_filter {
        statement(libc::BPF_RET | libc::BPF_K, action)
    }

    fn errno(e: i32) -> u32 {
        libc::SECCOMP_RET_ERRNO | (e as u32 & libc::SECCOMP_RET_DATA)
    }

    /// The filter's program (classic BPF).
    pub(super) fn build() -> Vec<libc::sock_filter> {
        let mut p = vec![load(ABI), jump(libc::BPF_JEQ, ARCH, 1, 0), ret(errno(libc::EPERM)), load(NR)];
        if cfg!(target_arch = "x86_64") {
            p.extend([jump(libc::BPF_JGE, X32_BIT, 0, 1), ret(errno(libc::EPERM))]);
        }
        // clone: refused with a namespace flag, else allowed.
        p.extend([
            jump(libc::BPF_JEQ, libc::SYS_clone as u32, 0, 4),
            load(ARG0_LOW),
            jump(libc::BPF_JSET, NAMESPACES, 0, 1),
            ret(errno(libc::EPERM)),
            ret(libc::SECCOMP_RET_ALLOW),
        ]);
        for nr in ABSENT {
            p.extend([jump(libc::BPF_JEQ, nr as u32, 0, 1), ret(errno(libc::ENOSYS))]);
        }
        for nr in REFUSED {
            p.extend([jump(libc::BPF_JEQ, nr as u32, 0, 1), ret(errno(libc::EPERM))]);
        }
        p.push(ret(libc::SECCOMP_RET_ALLOW));
        p
    }
}

/// The filter for `syscalls`, made once, before any fork (`None`: nothing to install).
pub(crate) fn filter(syscalls: TaskSyscalls) -> Option<&'static [libc::sock_filter]> {
    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    {
        static PROGRAM: std::sync::OnceLock<Vec<libc::sock_filter>> = std::sync::OnceLock::new();
        (syscalls == TaskSyscalls::Restricted).then(|| PROGRAM.get_or_init(program::build).as_slice())
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        let _ = syscalls;
        None
    }
}

/// Installs `program` on the calling thread, which has `no_new_privs` (a system call only: for a
/// forked child before exec).
#[allow(unsafe_code)]
pub(crate) fn install(program: &'static [libc::sock_filter]) -> io::Result<()> {
    let prog = libc::sock_fprog { len: program.len() as libc::c_ushort, filter: program.as_ptr().cast_mut() };
    // SAFETY: prctl(2) with a pointer to a `sock_fprog` on the stack whose filter points into a
    // program that lives as long as the process; the kernel copies it.
    let r = unsafe {
        libc::prctl(libc::PR_SET_SECCOMP, libc::SECCOMP_MODE_FILTER as libc::c_ulong, &prog as *const libc::sock_fprog)
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
