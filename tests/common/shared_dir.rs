//! A folder a test shares with the tasks it runs, for the test crates of the whole workspace
//! (the backend's and the worker's include this file by its path).
//!
//! Tasks run as task users when the tests run as root, and such a task has its own `/tmp`,
//! `/var/tmp` and `/dev/shm` where it gets a mount namespace: so, when it may be made, the
//! folder is in one of the machine's outside them (`/var/lib/sluice-tests`, mode 0711), else in
//! the temporary folder.
#![allow(dead_code)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

/// Where shared folders are made (see the module's documentation).
pub fn shared_root() -> PathBuf {
    let dir = PathBuf::from("/var/lib/sluice-tests");
    let made = std::fs::create_dir_all(&dir)
        .and_then(|()| std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o711)));
    if made.is_ok() { dir } else { std::env::temp_dir() }
}

/// A folder of its own in [`shared_root`] that every user may write, removed when dropped,
/// however the test ends. Each attempt of a task has a uid of its own: a file that later
/// attempts write to must be created writable for all (`umask 0`).
pub struct SharedDir(PathBuf);

impl SharedDir {
    pub fn new(name: &str) -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        let dir = shared_root().join(format!("sluice-{name}-{}-{n}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("creating a shared test folder");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).expect("opening a shared test folder");
        Self(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    /// `name` inside the folder, as a string for a task definition.
    pub fn file(&self, name: &str) -> String {
        self.0.join(name).to_string_lossy().into_owned()
    }
}

impl Drop for SharedDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
