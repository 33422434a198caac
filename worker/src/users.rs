//! Task users: a range of otherwise unused uids, one held by each running process task.
//!
//! A uid is held through an exclusive `flock` on `<lock dir>/<uid>`, so every worker process on the
//! machine that uses the same lock directory hands out each uid to one task at a time; the lock goes
//! with the process that held it, a killed worker included. After a task is done (and before a task
//! gets a uid whose lock file does not say it was given back cleared, as a killed worker leaves it),
//! every process of that uid is killed (those that left the task's process group with `setsid`
//! too, and those a killed worker left behind), and what that uid left in the machine's shared
//! temporary folders and System V IPC objects is removed. So a task never sees what an earlier task of
//! another tenant left, and nothing a task started outlives it. The lock is let go only once that is
//! done, also when the task's future is dropped midway.

use std::fs::{File, OpenOptions, TryLockError};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

/// The lock directory workers use unless told otherwise.
pub const DEFAULT_LOCK_DIR: &str = "/run/sluice/task-uids";

/// World-writable folders whose top-level entries owned by a task user are removed with it.
const SHARED_TEMP: [&str; 5] = ["/tmp", "/var/tmp", "/dev/shm", "/run/lock", "/dev/mqueue"];

/// How long to keep killing a uid's processes before giving up (a fork bomb is capped by the task's
/// process limit, so a few rounds kill it).
const PURGE_PATIENCE: Duration = Duration::from_secs(5);

/// A range of uids (each with the gid of the same number) for process tasks; see the module docs.
#[derive(Debug)]
pub struct TaskUsers {
    first: u32,
    count: u32,
    lock_dir: PathBuf,
    next: AtomicU32,
}

impl TaskUsers {
    /// The uids `first ..= first + count - 1`, held through locks in `lock_dir` (created mode 0700 when
    /// missing). The range must not hold root or any uid that something else on the machine runs as:
    /// every process of a uid is killed before and after each task that holds it. In a user namespace,
    /// the whole range must be mapped.
    pub fn new(first: u32, count: u32, lock_dir: impl Into<PathBuf>) -> io::Result<Self> {
        let invalid = |m: String| io::Error::new(io::ErrorKind::InvalidInput, m);
        let last = Self::check_range(first, count).map_err(invalid)?;
        for map in ["/proc/self/uid_map", "/proc/self/gid_map"] {
            let text = std::fs::read_to_string(map)?;
            if !mapped(&text, first, last) {
                return Err(invalid(format!(
                    "the task uid range {first}-{last} is not wholly mapped in this user namespace ({map}: {})",
                    text.split_whitespace().collect::<Vec<_>>().join(" ")
                )));
            }
        }
        let lock_dir = lock_dir.into();
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&lock_dir)?;
        let meta = std::fs::symlink_metadata(&lock_dir)?;
        if !meta.is_dir() || meta.uid() != nix::unistd::geteuid().as_raw() {
            return Err(invalid(format!("{} is not a folder of this user", lock_dir.display())));
        }
        std::fs::set_permissions(&lock_dir, std::fs::Permissions::from_mode(0o700))?;
        // Tasks of processes started together should not all try the same uids first.
        let start = std::process::id().wrapping_mul(2_654_435_761) % count;
        Ok(TaskUsers { first, count, lock_dir, next: AtomicU32::new(start) })
    }

    /// The last uid of the range of `count` uids from `first`, or why that range cannot be task
    /// users: it is empty, goes past the largest uid, or holds a system uid (below 1000, or 65534
    /// `nobody`).
    pub fn check_range(first: u32, count: u32) -> Result<u32, String> {
        if count == 0 {
            return Err("the task uid range is empty".into());
        }
        let last = first
            .checked_add(count - 1)
            .filter(|l| *l < u32::MAX)
            .ok_or_else(|| format!("the task uid range {first}+{count} goes past the largest uid, {}", u32::MAX - 1))?;
        if first < 1000 || (first..=last).contains(&65534) {
            return Err(format!(
                "the task uid range {first}-{last} holds a system uid (below 1000, or 65534 `nobody`)"
            ));
        }
        Ok(last)
    }

    /// The first and the last uid of the range.
    pub fn range(&self) -> (u32, u32) {
        (self.first, self.first + (self.count - 1))
    }

    /// A uid no other task holds, or `None` when all are held. The uid is purged before it is returned;
    /// one that cannot be purged stays locked (out of use) until this process ends.
    pub(crate) async fn try_acquire(&self) -> io::Result<Option<TaskUser>> {
        for _ in 0..self.count {
            let uid = self.first + self.next.fetch_add(1, Ordering::Relaxed) % self.count;
            let lock = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .custom_flags(nix::libc::O_NOFOLLOW)
                .open(self.lock_dir.join(uid.to_string()))?;
            match lock.try_lock() {
                Ok(()) => {
                    // Whatever a worker that died holding this uid left behind goes first. A uid
                    // given back cleared says so in its lock file, and needs nothing more.
                    match tokio::task::spawn_blocking(move || (take(uid, &lock), lock)).await {
                        Ok((Ok(()), lock)) => return Ok(Some(TaskUser { uid, lock: Some(lock), keys: true })),
                        Ok((Err(e), lock)) => {
                            quarantine(uid, &e);
                            std::mem::forget(lock);
                        }
                        Err(e) => return Err(io::Error::other(e)),
                    }
                }
                Err(TryLockError::WouldBlock) => continue,
                Err(TryLockError::Error(e)) => return Err(e),
            }
        }
        Ok(None)
    }
}

/// What a lock file says once its uid was given back cleared.
const CLEARED: &[u8] = b"cleared\n";

/// Purges `uid` unless its lock file says it was given back cleared, and marks it held.
fn take(uid: u32, lock: &File) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    let mut said = [0u8; CLEARED.len()];
    let cleared = lock.read_exact_at(&mut said, 0).is_ok() && said == CLEARED;
    lock.set_len(0)?;
    if !cleared {
        purge(uid, true)?;
    }
    Ok(())
}

/// Whether the uid (or gid) map of a user namespace maps every id of `first..=last`.
fn mapped(map: &str, first: u32, last: u32) -> bool {
    let mut ranges: Vec<(u64, u64)> = map
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace().map(|n| n.parse::<u64>().ok());
            let (inside, _outside, count) = (f.next()??, f.next()??, f.next()??);
            Some((inside, inside + count))
        })
        .collect();
    ranges.sort_unstable();
    let mut need = u64::from(first);
    for (start, end) in ranges {
        if start <= need && need < end {
            need = end;
        }
    }
    need > u64::from(last)
}

/// Says that a uid is kept out of use: its lock is never let go (the caller forgets it).
fn quarantine(uid: u32, e: &io::Error) {
    tracing::error!(uid, error = %e, "cannot clear a task user; it is not given out again by this process");
}

/// A uid held by one task; give it back with [`TaskUser::release`] (dropping it purges it on a thread
/// of its own and lets the uid go afterwards).
#[derive(Debug)]
pub(crate) struct TaskUser {
    pub(crate) uid: u32,
    lock: Option<File>,
    /// Whether a process of this attempt may have left keys in the uid's keyrings (not when each
    /// ran under a filter refusing the keyring calls), so that they are emptied with the purge.
    keys: bool,
}

impl TaskUser {
    /// Kills the uid's processes (those that left the task's process group too), which closes the log
    /// pipes they held.
    pub(crate) async fn kill_processes(&self) {
        let uid = self.uid;
        match tokio::task::spawn_blocking(move || kill_all(uid)).await.map_err(io::Error::other) {
            Ok(Ok(())) => {}
            Ok(Err(e)) | Err(e) => tracing::warn!(uid, error = %e, "cannot kill a task user's processes"),
        }
    }

    /// Says that every process of this attempt runs under a system call filter that refuses the
    /// keyring calls: the purge need not empty the uid's keyrings (a forked child each time).
    pub(crate) fn keyrings_closed(&mut self) {
        self.keys = false;
    }

    /// Kills the uid's processes, removes what it left and lets the uid go. The lock moves into the
    /// purge, so the uid stays held until the purge ends even if this future is dropped.
    pub(crate) async fn release(mut self) {
        let (uid, lock, keys) = (self.uid, self.lock.take(), self.keys);
        let _ = tokio::task::spawn_blocking(move || release_blocking(uid, lock, keys)).await;
    }
}

impl TaskUser {
    /// On a thread of its own: kills the uid's processes, runs `then` (which may remove what they
    /// wrote), and releases the uid; for a task whose future was dropped, where nothing may block.
    pub(crate) fn release_on_thread(mut self, then: impl FnOnce() + Send + 'static) {
        let (uid, lock, keys) = (self.uid, self.lock.take(), self.keys);
        let spawned = std::thread::Builder::new().name("sluice-task-user".into()).spawn(move || {
            if let Err(e) = kill_all(uid) {
                tracing::warn!(uid, error = %e, "cannot kill a task user's processes");
            }
            then();
            release_blocking(uid, lock, keys);
        });
        if let Err(e) = spawned {
            tracing::error!(uid, error = %e, "cannot clear a task user; it is not given out again");
        }
    }
}

impl Drop for TaskUser {
    fn drop(&mut self) {
        if self.lock.is_some() {
            let user = TaskUser { uid: self.uid, lock: self.lock.take(), keys: self.keys };
            user.release_on_thread(|| {});
        }
    }
}

fn release_blocking(uid: u32, lock: Option<File>, keys: bool) {
    match purge(uid, keys) {
        Ok(()) => {
            if let Some(lock) = &lock {
                use std::os::unix::fs::FileExt;
                // A uid whose mark is lost is purged again by its next holder; nothing more.
                let _ = lock.write_all_at(CLEARED, 0);
            }
            drop(lock);
        }
        Err(e) => {
            quarantine(uid, &e);
            std::mem::forget(lock);
        }
    }
}

/// Kills every process of `uid`, removes the entries it owns at the top of the shared temporary
/// folders and its System V IPC objects, and, when it may hold `keys`, empties its kernel keyrings.
fn purge(uid: u32, keys: bool) -> io::Result<()> {
    kill_all(uid)?;
    for dir in SHARED_TEMP {
        remove_owned(Path::new(dir), uid);
    }
    remove_ipc(uid);
    if keys { clear_keyrings(uid) } else { Ok(()) }
}

/// Empties the kernel keyrings a uid keeps from one of its processes to the next (its user and
/// user-session keyrings, and its persistent one): a task could leave a key there for the next task
/// of the uid, another tenant's. Only the uid reaches them, so a child (forked, never exec'd)
/// becomes the uid for this alone, once every process of the uid is gone. A kernel without keys
/// has nothing to clear.
#[allow(unsafe_code)]
fn clear_keyrings(uid: u32) -> io::Result<()> {
    crate::process::in_child(move || {
        use nix::libc;
        const KEYCTL_CLEAR: libc::c_long = 7;
        const KEYCTL_GET_PERSISTENT: libc::c_long = 22;
        const KEY_SPEC_PROCESS_KEYRING: libc::c_long = -2;
        const KEY_SPEC_USER_KEYRING: libc::c_long = -4;
        const KEY_SPEC_USER_SESSION_KEYRING: libc::c_long = -5;
        let absent = |e: &io::Error| matches!(e.raw_os_error(), Some(libc::ENOSYS | libc::EOPNOTSUPP));
        crate::process::become_user(uid, uid)?;
        // SAFETY: plain system calls with integer arguments, in a child before it would exec.
        unsafe {
            // (No allocation after fork: a fixed array, 0 where the kernel keeps no persistent ring.)
            let mut rings = [KEY_SPEC_USER_KEYRING, KEY_SPEC_USER_SESSION_KEYRING, 0];
            let persistent =
                libc::syscall(libc::SYS_keyctl, KEYCTL_GET_PERSISTENT, -1 as libc::c_long, KEY_SPEC_PROCESS_KEYRING);
            if persistent > 0 {
                rings[2] = persistent;
            } else {
                let e = io::Error::last_os_error();
                if !absent(&e) {
                    return Err(e);
                }
            }
            for ring in rings.into_iter().filter(|&r| r != 0) {
                if libc::syscall(libc::SYS_keyctl, KEYCTL_CLEAR, ring) != 0 {
                    let e = io::Error::last_os_error();
                    if absent(&e) {
                        return Ok(());
                    }
                    return Err(e);
                }
            }
        }
        Ok(())
    })
    .map_err(|e| io::Error::other(format!("clearing the keyrings of uid {uid}: {e}")))
}

/// SIGKILLs every live process whose real, effective or saved uid is `uid`, until none is left
/// (zombies aside: they run nothing). Each process is signalled through a pidfd opened before its uid
/// is checked, so a pid that was reused meanwhile is never signalled.
fn kill_all(uid: u32) -> io::Result<()> {
    let start = std::time::Instant::now();
    loop {
        let pids = processes_of(uid)?;
        if pids.is_empty() {
            return Ok(());
        }
        if start.elapsed() > PURGE_PATIENCE {
            return Err(io::Error::other(format!("{} process(es) of uid {uid} alive after SIGKILL", pids.len())));
        }
        for pid in pids {
            kill_if_still_of(pid, uid);
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[allow(unsafe_code)]
fn kill_if_still_of(pid: i32, uid: u32) {
    use nix::libc;
    // SAFETY: pidfd_open(2) takes a pid and flags and returns a new file descriptor or -1, which is
    // owned here (and closed when dropped); pidfd_send_signal(2) takes that descriptor, a signal
    // number and null info. Neither touches memory of this process.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        // No pidfds (Linux before 5.3, or a seccomp profile without them): by pid, checked just
        // before, as before pidfds existed.
        let errno = io::Error::last_os_error().raw_os_error();
        if matches!(errno, Some(libc::ENOSYS | libc::EPERM)) && running_as(pid, uid) {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
        }
        return;
    }
    let Ok(fd) = i32::try_from(fd) else { return };
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    if running_as(pid, uid) {
        let sent = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                fd.as_raw_fd(),
                libc::SIGKILL,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        if sent != 0 {
            tracing::warn!(pid, uid, error = %io::Error::last_os_error(), "cannot kill a task user's process");
        }
    }
}

/// The real, effective and saved uid of a process (or thread), and whether it is a zombie.
fn status_of(path: &Path) -> Option<([u32; 3], bool)> {
    let status = std::fs::read_to_string(path).ok()?;
    let field = |name: &str| status.lines().find_map(|l| l.strip_prefix(name)).map(str::trim);
    let zombie = field("State:").is_some_and(|s| s.starts_with('Z') || s.starts_with('X'));
    let mut uids = field("Uid:")?.split_whitespace().map(|u| u.parse::<u32>().ok());
    Some(([uids.next()??, uids.next()??, uids.next()??], zombie))
}

/// Whether process `pid` runs (any thread of it: a process whose first thread has ended shows as a
/// zombie while its other threads go on) with `uid` as its real, effective or saved uid.
fn running_as(pid: i32, uid: u32) -> bool {
    match status_of(Path::new(&format!("/proc/{pid}/status"))) {
        Some((uids, _)) if !uids.contains(&uid) => false,
        Some((_, false)) => true,
        Some((_, true)) => std::fs::read_dir(format!("/proc/{pid}/task")).is_ok_and(|tasks| {
            tasks.flatten().any(|t| status_of(&t.path().join("status")).is_some_and(|(_, zombie)| !zombie))
        }),
        None => false,
    }
}

/// Processes running with `uid` as their real, effective or saved uid, from `/proc`.
fn processes_of(uid: u32) -> io::Result<Vec<i32>> {
    let mut pids = Vec::new();
    for e in std::fs::read_dir("/proc")? {
        let Some(pid) = e?.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else { continue };
        if running_as(pid, uid) {
            pids.push(pid);
        }
    }
    Ok(pids)
}

/// Removes the entries of `dir` (not its deeper ones) that `uid` owns, never following a symlink.
fn remove_owned(dir: &Path, uid: u32) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let Ok(meta) = e.path().symlink_metadata() else { continue };
        if meta.uid() != uid {
            continue;
        }
        let path = e.path();
        let result = if meta.is_dir() { std::fs::remove_dir_all(&path) } else { std::fs::remove_file(&path) };
        if let Err(e) = result {
            tracing::warn!(path = %path.display(), error = %e, "cannot remove a task user's temporary file");
        }
    }
}

/// Removes the System V shared memory segments, semaphore sets and message queues `uid` owns or
/// created.
#[allow(unsafe_code)]
fn remove_ipc(uid: u32) {
    for (kind, id_column) in [("shm", "shmid"), ("sem", "semid"), ("msg", "msqid")] {
        let Ok(table) = std::fs::read_to_string(format!("/proc/sysvipc/{kind}")) else { continue };
        for id in ipc_ids_of(&table, id_column, uid) {
            // SAFETY: IPC_RMID takes no buffer (null is allowed) and only removes the object `id`.
            let removed = unsafe {
                match kind {
                    "shm" => nix::libc::shmctl(id, nix::libc::IPC_RMID, std::ptr::null_mut()),
                    "sem" => nix::libc::semctl(id, 0, nix::libc::IPC_RMID),
                    _ => nix::libc::msgctl(id, nix::libc::IPC_RMID, std::ptr::null_mut()),
                }
            };
            if removed != 0 {
                tracing::warn!(uid, kind, id, "cannot remove a task user's IPC object");
            }
        }
    }
}

/// Ids of the objects of a `/proc/sysvipc/*` table whose owner (`uid`) or creator (`cuid`) is `uid`.
fn ipc_ids_of(table: &str, id_column: &str, uid: u32) -> Vec<i32> {
    let mut lines = table.lines();
    let Some(header) = lines.next() else { return vec![] };
    let columns: Vec<&str> = header.split_whitespace().collect();
    let at = |name: &str| columns.iter().position(|c| *c == name);
    let (Some(id), Some(owner), Some(creator)) = (at(id_column), at("uid"), at("cuid")) else { return vec![] };
    lines
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let is = |i: usize| f.get(i).and_then(|v| v.parse::<u32>().ok()) == Some(uid);
            (is(owner) || is(creator)).then(|| f.get(id)?.parse().ok()).flatten()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_range_is_mapped_only_when_every_id_is() {
        let host = "         0          0 4294967295\n";
        assert!(mapped(host, 2_000_000_000, 2_000_000_999));
        let container = "         0     100000      65536\n";
        assert!(mapped(container, 1000, 65535));
        assert!(!mapped(container, 60000, 70000));
        assert!(!mapped(container, 2_000_000_000, 2_000_000_999));
        let split = "0 1000 10\n10 5000 100\n200 9000 50\n";
        assert!(mapped(split, 5, 109));
        assert!(!mapped(split, 5, 110));
        assert!(!mapped(split, 205, 260));
        assert!(!mapped("", 1000, 1000));
    }

    #[test]
    fn ipc_objects_are_found_by_owner_or_creator() {
        let shm = "       key      shmid perms                  size  cpid  lpid nattch   uid   gid  cuid  cgid\n\
                   0          7   600                    4096   10    10      0  2000  2000  2000  2000\n\
                   0          8   600                    4096   10    10      0     0     0  2000  2000\n\
                   0          9   600                    4096   10    10      0     0     0     0     0\n";
        assert_eq!(ipc_ids_of(shm, "shmid", 2000), vec![7, 8]);
        assert_eq!(ipc_ids_of(shm, "shmid", 3000), Vec::<i32>::new());
        assert_eq!(ipc_ids_of("", "shmid", 2000), Vec::<i32>::new());
    }
}
