//! Task users: a range of otherwise unused uids, one held by each running process task.
//!
//! A uid is held through an exclusive `flock` on `<lock dir>/<uid>`, so every worker process on the
//! machine that uses the same lock directory hands out each uid to one task at a time; the lock goes
//! with the process that held it, a killed worker included. Before a task gets a uid and after it is
//! done, every process of that uid is killed (those that left the task's process group with `setsid`
//! too, and those a killed worker left behind) and the files that uid left in the machine's shared
//! temporary folders are removed. So a task never sees what an earlier task of another tenant left, and
//! nothing a task started outlives it.

use std::fs::{File, OpenOptions, TryLockError};
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::wait::{WaitStatus, waitpid};
use nix::unistd::{ForkResult, fork};

/// The lock directory workers use unless told otherwise.
pub const DEFAULT_LOCK_DIR: &str = "/run/sluice/task-uids";

/// World-writable folders whose top-level entries owned by a task user are removed with it.
const SHARED_TEMP: [&str; 4] = ["/tmp", "/var/tmp", "/dev/shm", "/run/lock"];

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
    /// every process of a uid is killed before and after each task that holds it.
    pub fn new(first: u32, count: u32, lock_dir: impl Into<PathBuf>) -> io::Result<Self> {
        let invalid = |m: String| io::Error::new(io::ErrorKind::InvalidInput, m);
        if count == 0 {
            return Err(invalid("the task uid range is empty".into()));
        }
        let last = first.checked_add(count - 1).filter(|l| *l < u32::MAX).ok_or_else(|| {
            invalid(format!("the task uid range {first}+{count} goes past the largest uid, {}", u32::MAX - 1))
        })?;
        if first < 1000 || (first..=last).contains(&65534) {
            return Err(invalid(format!(
                "the task uid range {first}-{last} holds a system uid (below 1000, or 65534 `nobody`)"
            )));
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

    /// The first and the last uid of the range.
    pub fn range(&self) -> (u32, u32) {
        (self.first, self.first + (self.count - 1))
    }

    /// A uid no other task holds, or `None` when all are held. The uid is purged before it is returned.
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
                    let user = TaskUser { uid, lock: Some(lock) };
                    // Whatever a worker that died holding this uid left behind goes first.
                    purge_blocking(uid).await?;
                    return Ok(Some(user));
                }
                Err(TryLockError::WouldBlock) => continue,
                Err(TryLockError::Error(e)) => return Err(e),
            }
        }
        Ok(None)
    }
}

/// A uid held by one task; give it back with [`TaskUser::release`] (dropping it purges it in place).
#[derive(Debug)]
pub(crate) struct TaskUser {
    pub(crate) uid: u32,
    lock: Option<File>,
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

    /// Kills the uid's processes, removes its temporary files and lets the uid go.
    pub(crate) async fn release(mut self) {
        let uid = self.uid;
        if let Err(e) = purge_blocking(uid).await {
            // The lock stays held until this process ends, so no other task gets a uid in this state.
            tracing::error!(uid, error = %e, "cannot clear a task user; it is not given out again");
            std::mem::forget(self.lock.take());
        }
        self.lock = None;
    }
}

impl Drop for TaskUser {
    fn drop(&mut self) {
        if self.lock.is_some()
            && let Err(e) = purge(self.uid)
        {
            tracing::error!(uid = self.uid, error = %e, "cannot clear a task user; it is not given out again");
            std::mem::forget(self.lock.take());
        }
    }
}

async fn purge_blocking(uid: u32) -> io::Result<()> {
    tokio::task::spawn_blocking(move || purge(uid)).await.map_err(io::Error::other)?
}

/// Kills every process of `uid` and removes the entries it owns at the top of the shared temporary
/// folders.
pub(crate) fn purge(uid: u32) -> io::Result<()> {
    kill_all(uid)?;
    for dir in SHARED_TEMP {
        remove_owned(Path::new(dir), uid);
    }
    Ok(())
}

/// Kills every live process of `uid`: a child that becomes `uid` sends SIGKILL to every process it may
/// signal (`kill(-1)`: those whose real or saved uid is `uid`), until none is left but zombies.
fn kill_all(uid: u32) -> io::Result<()> {
    let start = std::time::Instant::now();
    loop {
        match kill_round(uid)? {
            0 => return Ok(()),
            _ if live_processes_of(uid) == 0 => return Ok(()),
            _ if start.elapsed() > PURGE_PATIENCE => {
                return Err(io::Error::other(format!("processes of uid {uid} still alive after SIGKILL")));
            }
            _ => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

/// One round of kills in a child running as `uid`: exit code 0 when it found no process to signal, 1
/// when some were still there after 20 tries (zombies count: they are gone only once reaped).
#[allow(unsafe_code)]
fn kill_round(uid: u32) -> io::Result<i32> {
    // SAFETY: after fork the child calls only async-signal-safe system calls (setgroups, setgid, setuid,
    // kill, nanosleep, _exit) through libc, allocates nothing and never returns into Rust code.
    match unsafe { fork() }? {
        ForkResult::Child => unsafe {
            use nix::libc;
            if libc::setgroups(0, std::ptr::null()) != 0 || libc::setgid(uid) != 0 || libc::setuid(uid) != 0 {
                libc::_exit(2);
            }
            for _ in 0..20 {
                if libc::kill(-1, libc::SIGKILL) != 0 && *libc::__errno_location() == libc::ESRCH {
                    libc::_exit(0);
                }
                let pause = libc::timespec { tv_sec: 0, tv_nsec: 1_000_000 };
                libc::nanosleep(&pause, std::ptr::null_mut());
            }
            libc::_exit(1)
        },
        ForkResult::Parent { child } => loop {
            match waitpid(child, None) {
                Ok(WaitStatus::Exited(_, 2)) => return Err(io::Error::other(format!("cannot become uid {uid}"))),
                Ok(WaitStatus::Exited(_, code)) => return Ok(code),
                Ok(_) => return Ok(1),
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            }
        },
    }
}

/// Live (not zombie) processes whose real uid is `uid`, from `/proc`.
pub(crate) fn live_processes_of(uid: u32) -> usize {
    let Ok(entries) = std::fs::read_dir("/proc") else { return 0 };
    let mut n = 0;
    for e in entries.flatten() {
        if e.file_name().to_str().is_none_or(|s| s.parse::<u32>().is_err()) {
            continue;
        }
        let Ok(status) = std::fs::read_to_string(e.path().join("status")) else { continue };
        let field = |name: &str| status.lines().find_map(|l| l.strip_prefix(name)).map(str::trim).map(str::to_owned);
        let zombie = field("State:").is_some_and(|s| s.starts_with('Z') || s.starts_with('X'));
        let real = field("Uid:").and_then(|u| u.split_whitespace().next().and_then(|r| r.parse::<u32>().ok()));
        if real == Some(uid) && !zombie {
            n += 1;
        }
    }
    n
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
