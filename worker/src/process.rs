//! `Run` and `Shell` tasks: a sandboxed child process in its own process group.

use std::collections::BTreeMap;
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::resource::{Resource, getrlimit, setrlimit};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::process::Command;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::logs::{LogSink, pump};
use crate::users::{TaskUser, TaskUsers};
use crate::{ExecOutcome, Limits, Stream, TaskNetwork, TaskRequest, cancelled, deadline_reached, outputs};

/// `PATH` of every task (the worker's own is never passed on).
pub(crate) const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Name of the outputs file inside the work directory.
const OUTPUT_FILE: &str = "sluice-output";

/// How long log readers may take to finish once the process group is dead (only a process that left the
/// group can still hold the pipes open, or a log receiver that stopped reading).
const READER_GRACE: Duration = Duration::from_secs(5);

/// How long to keep killing a process group until no live member is left.
const KILL_PATIENCE: Duration = Duration::from_secs(5);

fn failed(message: String) -> (ExecOutcome, BTreeMap<String, String>) {
    (ExecOutcome::Failed { exit_code: None, message }, BTreeMap::new())
}

/// Runs `argv` in the sandbox described in the crate docs.
pub(crate) async fn run(
    argv: Vec<String>,
    req: &TaskRequest,
    sink: Arc<LogSink>,
    deadline: Option<Instant>,
    cancel: &mut watch::Receiver<bool>,
) -> (ExecOutcome, BTreeMap<String, String>) {
    let Some((program, args)) = argv.split_first() else {
        return failed("nothing to run: empty argv".to_owned());
    };
    let mut cleanup = Cleanup { pgid: None, user: None, user_killed: false, workdir: None };
    if let Some(users) = &req.users {
        match take_user(users, &sink, deadline, cancel).await {
            Ok(user) => cleanup.user = Some(user),
            Err(ended) => return ended,
        }
    }
    // A uid of the range, held for this attempt alone, else the one given.
    let run_as = cleanup.user.as_ref().map(|u| (u.uid, u.uid)).or(req.run_as);
    let workdir = match create_workdir(&req.work_root, run_as) {
        Ok(w) => w,
        Err(e) => {
            cleanup.finish().await;
            return failed(format!("cannot create the work directory in {}: {e}", req.work_root.display()));
        }
    };
    cleanup.workdir = Some(workdir.clone());
    let output_path = workdir.join(OUTPUT_FILE);
    if let Err(e) = create_output_file(&output_path, run_as) {
        cleanup.finish().await;
        return failed(format!("cannot create the outputs file: {e}"));
    }

    let mut cmd = Command::new(program);
    cmd.args(args).env_clear();
    for (k, v) in &req.env {
        if k.is_empty() || k.contains('=') || k.contains('\0') || v.contains('\0') {
            sink.system(&format!("environment variable {k:?} skipped: invalid name or value")).await;
            continue;
        }
        cmd.env(k, v);
    }
    cmd.env("PATH", DEFAULT_PATH)
        .env("HOME", &workdir)
        .env("SLUICE_WORKDIR", &workdir)
        .env("SLUICE_OUTPUT", &output_path)
        .current_dir(&workdir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    // A task user sees only its own processes: no other task's command line (where a secret may
    // have been rendered), no worker. An isolated task reaches no network but its own loopback.
    let network = req.network == TaskNetwork::Isolated;
    let own = Namespaces { proc: cleanup.user.is_some() && own_proc_works(), network };
    match run_as {
        // Root, or the worker's own user, could leave the namespace again (setns, ptrace).
        None | Some((0, _)) if network => {
            cleanup.finish().await;
            return failed("an isolated network takes a task user (a worker running as root)".to_owned());
        }
        Some((uid, gid)) if own.proc || own.network => match Switch::new(uid, gid, &workdir, network) {
            Some(mut switch) => {
                // Its own temporary folders, and for a task user of the range its name in its own
                // `passwd` and `group`.
                let (dir, named) = (workdir.clone(), cleanup.user.is_some());
                let made = tokio::task::spawn_blocking(move || {
                    make_sandbox_dir(&dir).map(|()| named.then(|| write_identity(&dir, uid, gid)))
                })
                .await;
                match made.map_err(io::Error::other).and_then(|m| m) {
                    Ok(None) => {}
                    Ok(Some(Ok(identity))) => switch.identity = identity,
                    Ok(Some(Err(e))) => sink.system(&format!("the task user has no passwd entry here: {e}")).await,
                    Err(e) => {
                        cleanup.finish().await;
                        return failed(format!("cannot make the task's own temporary folders: {e}"));
                    }
                }
                enter_then_switch(&mut cmd, own, switch)
            }
            None => {
                cleanup.finish().await;
                return failed(format!("the work directory {} holds a NUL byte", workdir.display()));
            }
        },
        // std also drops the supplementary groups (setgroups(0)) when switching from root.
        Some((uid, gid)) => {
            cmd.uid(uid).gid(gid);
        }
        None => {}
    }
    // The filter is made before the fork; only a task of another user is filtered (it takes
    // `no_new_privs`, which only such a task gets).
    let filter = run_as.and_then(|_| crate::seccomp::filter(req.syscalls));
    if let (Some(_), Some(user)) = (filter, cleanup.user.as_mut()) {
        user.keyrings_closed();
    }
    set_limits(&mut cmd, req.limits, run_as.is_some(), filter);

    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            cleanup.finish().await;
            let hint = match (run_as.is_some() && e.kind() == io::ErrorKind::PermissionDenied, own.proc || own.network)
            {
                (true, false) => " (the work root must be traversable by the task user, e.g. mode 0711)",
                (true, true) => {
                    " (the work root must be traversable by the task user, e.g. mode 0711, and the worker allowed \
                     to make the task's namespaces)"
                }
                (false, true) => " (while making the task's namespaces, or starting it)",
                (false, false) => "",
            };
            return failed(format!("cannot start {program:?}: {e}{hint}"));
        }
    };
    cleanup.pgid = child.id().and_then(|p| i32::try_from(p).ok());

    let mut readers = Vec::new();
    if let Some(out) = child.stdout.take() {
        let s = sink.clone();
        readers.push(tokio::spawn(async move { pump(out, Stream::Stdout, &s).await }));
    }
    if let Some(err) = child.stderr.take() {
        let s = sink.clone();
        readers.push(tokio::spawn(async move { pump(err, Stream::Stderr, &s).await }));
    }

    let outcome = tokio::select! {
        status = child.wait() => status_outcome(status),
        _ = deadline_reached(deadline) => ExecOutcome::TimedOut,
        _ = cancelled(cancel) => ExecOutcome::Cancelled,
    };
    // Whatever happened, nothing the task started outlives it (background jobs included).
    cleanup.kill().await;
    let _ = child.wait().await;
    for mut r in readers {
        if tokio::time::timeout(READER_GRACE, &mut r).await.is_err() {
            r.abort();
            sink.system("log capture stopped: output pipe still open after the task ended").await;
        }
    }

    let owner = run_as.map_or_else(|| nix::unistd::geteuid().as_raw(), |(uid, _)| uid);
    let outputs = match outputs::read_file(&output_path, owner) {
        Ok((data, truncated)) => {
            if truncated {
                sink.system(&format!(
                    "outputs file larger than {} bytes; the rest is ignored, from the line it cuts",
                    outputs::MAX_OUTPUT_FILE
                ))
                .await;
            }
            let (parsed, problems) = outputs::parse(&data);
            for p in problems {
                // Masked whole, then shortened: a secret cut in two would not be recognised.
                let shown: String = sink.mask(&p).chars().take(outputs::SHOWN_PROBLEM_CHARS).collect();
                sink.system(&shown).await;
            }
            parsed.into_iter().map(|(k, v)| (k, sink.mask(&v))).collect()
        }
        Err(msg) => {
            sink.system(&msg).await;
            BTreeMap::new()
        }
    };
    cleanup.finish().await;
    (outcome, outputs)
}

fn status_outcome(status: io::Result<ExitStatus>) -> ExecOutcome {
    match status {
        Ok(s) if s.success() => ExecOutcome::Succeeded,
        Ok(s) => match (s.code(), s.signal()) {
            (Some(code), _) => {
                ExecOutcome::Failed { exit_code: Some(code), message: format!("exited with code {code}") }
            }
            (None, Some(sig)) => {
                let name = Signal::try_from(sig).map_or_else(|_| format!("signal {sig}"), |s| s.as_str().to_owned());
                ExecOutcome::Failed { exit_code: None, message: format!("killed by {name}") }
            }
            (None, None) => ExecOutcome::Failed { exit_code: None, message: format!("ended: {s}") },
        },
        Err(e) => ExecOutcome::Failed { exit_code: None, message: format!("waiting for the process failed: {e}") },
    }
}

/// The namespaces a task gets of its own.
#[derive(Clone, Copy)]
struct Namespaces {
    /// A mount namespace with its own `/proc` ([`new_proc`]; only where [`own_proc_works`]) and
    /// its own temporary folders ([`PRIVATE_DIRS`]).
    proc: bool,
    /// A network namespace with only its own loopback ([`own_network`]), and a mount namespace
    /// whose [`PRIVATE_DIRS`] are its own, `/run` included (the machine's Unix sockets live there).
    network: bool,
}

/// What a task's own folder in place of the machine's is.
#[derive(Clone, Copy)]
enum Backing {
    /// The folder of this name in the task's [`sandbox_dir`], on the disk of the work root (what a
    /// task writes to `/tmp` can be large: it should not take memory).
    Disk(&'static str),
    /// A fresh `tmpfs` with these options (in memory, as the machine's own is).
    Memory(&'static std::ffi::CStr),
}

/// Folders a task with a mount namespace of its own gets empty ones of its own in place of, gone
/// with the task: no other task, running at the same time or later, sees what it leaves there, and
/// it sees nothing of theirs. `/run` only for an isolated task (a task on the machine's network may
/// need what is there, such as the resolver's configuration): the Unix sockets of the machine's
/// services (the database's, D-Bus, name lookups through systemd-resolved or nscd) live in these
/// folders, and a Unix socket with a path is not bound to a network namespace (an abstract one is).
/// The work directory, when it is inside one, is carried over into the new one. Each with whether
/// only an isolated task gets it.
const PRIVATE_DIRS: [(&std::ffi::CStr, Backing, bool); 4] = [
    (c"/tmp", Backing::Disk("tmp"), false),
    (c"/var/tmp", Backing::Disk("var-tmp"), false),
    (c"/dev/shm", Backing::Memory(c"mode=1777"), false),
    (c"/run", Backing::Memory(c"mode=0755"), true),
];

/// `path` as a C string (`None` when it holds a NUL byte).
fn c_path(path: &Path) -> Option<std::ffi::CString> {
    std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).ok()
}

/// For a work directory inside one of [`PRIVATE_DIRS`] (of an isolated task, when `isolated`): the
/// folders below that one down to the work directory itself, to make in the new one (empty
/// elsewhere; `None` for a NUL byte).
fn carried_folders(workdir: &Path, isolated: bool) -> Option<Vec<std::ffi::CString>> {
    use std::os::unix::ffi::OsStrExt;
    let private = PRIVATE_DIRS
        .iter()
        .filter(|(_, _, only_isolated)| isolated || !only_isolated)
        .map(|(dir, _, _)| Path::new(std::ffi::OsStr::from_bytes(dir.to_bytes())));
    let Some(top) = private.into_iter().find(|d| workdir.starts_with(d)) else { return Some(vec![]) };
    let mut below: Vec<&Path> = workdir.ancestors().take_while(|a| *a != top).collect();
    below.reverse();
    below.into_iter().map(c_path).collect()
}

/// What the child becomes after entering its namespaces, all made before the fork.
struct Switch {
    uid: u32,
    gid: u32,
    /// The work directory.
    dir: std::ffi::CString,
    /// For a task whose work directory is inside one of [`PRIVATE_DIRS`]: the folders to make in
    /// the new one, down to the work directory itself, where it is mounted again.
    carried: Vec<std::ffi::CString>,
    /// For each of [`PRIVATE_DIRS`] on disk, the task's own folder in its [`sandbox_dir`].
    sources: [Option<std::ffi::CString>; PRIVATE_DIRS.len()],
    /// The `passwd` and `group` files mounted over the machine's (see [`write_identity`]).
    identity: Option<(std::ffi::CString, std::ffi::CString)>,
}

impl Switch {
    /// `None` when a path holds a NUL byte.
    fn new(uid: u32, gid: u32, workdir: &Path, network: bool) -> Option<Self> {
        let carried = carried_folders(workdir, network)?;
        let sandbox = sandbox_dir(workdir);
        let mut sources = [const { None }; PRIVATE_DIRS.len()];
        for (source, (_, backing, _)) in sources.iter_mut().zip(PRIVATE_DIRS) {
            if let Backing::Disk(name) = backing {
                *source = Some(c_path(&sandbox.join(name))?);
            }
        }
        Some(Self { uid, gid, dir: c_path(workdir)?, carried, sources, identity: None })
    }
}

/// In the child, before the rlimits: the namespaces of `own`, then the switch to the user with no
/// supplementary groups, and into the work directory again as that user (std changed into it as
/// root).
#[allow(unsafe_code)]
fn enter_then_switch(cmd: &mut Command, own: Namespaces, to: Switch) {
    // SAFETY: the closure runs in the forked child before exec. It calls only unshare(2), mount(2),
    // open_tree(2), move_mount(2), mkdir(2), socket(2), ioctl(2), close(2), setgroups(2), setgid(2),
    // setuid(2) and chdir(2) through libc, with static C strings, C strings made before the fork, a
    // zeroed struct on the stack and plain integers: no allocation, no lock, no state shared with
    // the parent.
    unsafe {
        cmd.pre_exec(move || {
            if own.network {
                own_network()?;
            }
            if own.proc || own.network {
                own_mounts()?;
            }
            if own.proc {
                new_proc()?;
            }
            // A name is a convenience: a task whose files cannot be mounted runs without one.
            // nscd would answer from the machine's files instead, so its socket is hidden.
            if let Some((passwd, group)) = &to.identity
                && bind(passwd, c"/etc/passwd").is_ok()
            {
                let _ = bind(group, c"/etc/group");
                let _ = hide(c"/run/nscd");
            }
            if own.proc || own.network {
                private_dirs(&to.dir, &to.carried, &to.sources, own.network)?;
            }
            become_user(to.uid, to.gid)?;
            if nix::libc::chdir(to.dir.as_ptr()) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// In a forked child (system calls only): drops the supplementary groups, then becomes
/// `gid` and `uid`.
#[allow(unsafe_code)]
pub(crate) fn become_user(uid: u32, gid: u32) -> io::Result<()> {
    use nix::libc;
    // SAFETY: plain system calls with integer arguments and a null pointer (no groups).
    if unsafe { libc::setgroups(0, std::ptr::null()) != 0 || libc::setgid(gid) != 0 || libc::setuid(uid) != 0 } {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The name a task user has inside its task: added to copies of `/etc/passwd` and `/etc/group`
/// mounted over the machine's in the task's own mount namespace.
pub const TASK_USER_NAME: &str = "sluice-task";

/// The folder, root's alone, beside a work directory that holds the task's own temporary folders
/// (see [`PRIVATE_DIRS`]) and its task user's `passwd` and `group`; removed with the work directory.
fn sandbox_dir(workdir: &Path) -> PathBuf {
    let mut name = workdir.as_os_str().to_owned();
    name.push(".sandbox");
    PathBuf::from(name)
}

/// Makes the [`sandbox_dir`] of `workdir`, with an empty folder for each of [`PRIVATE_DIRS`] on disk,
/// open to every user as the machine's are (mode 1777: whoever made a file there alone removes it).
fn make_sandbox_dir(workdir: &Path) -> io::Result<()> {
    let dir = sandbox_dir(workdir);
    std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
    for (_, backing, _) in PRIVATE_DIRS {
        if let Backing::Disk(name) = backing {
            let folder = dir.join(name);
            std::fs::create_dir(&folder)?;
            // Whatever the worker's umask.
            std::fs::set_permissions(&folder, std::fs::Permissions::from_mode(0o1777))?;
        }
    }
    Ok(())
}

/// Writes the machine's `/etc/passwd` and `/etc/group` with the task user added as
/// [`TASK_USER_NAME`] (its home the work directory, its group of the same name), for the task's own
/// mount namespace: programs that look their user up (`whoami`, `ssh`, `git`) find it. Entries of
/// the machine with that name, uid or gid are left out. `None` where the machine has no such files
/// or the path could not be written into them.
fn write_identity(workdir: &Path, uid: u32, gid: u32) -> io::Result<Option<(std::ffi::CString, std::ffi::CString)>> {
    let (passwd, group) = (Path::new("/etc/passwd"), Path::new("/etc/group"));
    let Some(home) = workdir.to_str().filter(|h| !h.contains([':', '\n'])) else { return Ok(None) };
    if !passwd.is_file() || !group.is_file() {
        return Ok(None);
    }
    // The machine's entries (as bytes: a comment field need not be UTF-8), less any with the
    // name, or with the id in the third field (the uid or gid).
    let others = |file: &Path, id: u32| -> io::Result<Vec<u8>> {
        let id = id.to_string();
        let mut kept = vec![];
        for line in std::fs::read(file)?.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
            let mut fields = line.split(|&b| b == b':');
            if fields.next() != Some(TASK_USER_NAME.as_bytes()) && fields.nth(1) != Some(id.as_bytes()) {
                kept.extend_from_slice(line);
                kept.push(b'\n');
            }
        }
        Ok(kept)
    };
    let dir = sandbox_dir(workdir);
    let write = |name: &str, mut text: Vec<u8>, entry: String| -> io::Result<std::ffi::CString> {
        text.extend_from_slice(entry.as_bytes());
        let path = dir.join(name);
        let mut file = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o644).open(&path)?;
        // Readable by the task whatever the worker's umask.
        file.set_permissions(std::fs::Permissions::from_mode(0o644))?;
        io::Write::write_all(&mut file, &text)?;
        c_path(&path).ok_or_else(|| io::Error::other("the path holds a NUL byte"))
    };
    let passwd =
        write("passwd", others(passwd, uid)?, format!("{TASK_USER_NAME}:x:{uid}:{gid}:Sluice task:{home}:/bin/sh\n"))?;
    let group = write("group", others(group, gid)?, format!("{TASK_USER_NAME}:x:{gid}:\n"))?;
    Ok(Some((passwd, group)))
}

/// Mounts an empty, read-only `tmpfs` over the folder `dir` (in the task's own mount namespace).
#[allow(unsafe_code)]
fn hide(dir: &std::ffi::CStr) -> io::Result<()> {
    use nix::libc;
    // SAFETY: a plain system call with static, NUL-terminated strings.
    let flags = libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    let mounted = unsafe { libc::mount(c"tmpfs".as_ptr(), dir.as_ptr(), c"tmpfs".as_ptr(), flags, std::ptr::null()) };
    Errno::result(mounted).map(drop).map_err(io::Error::from)
}

/// Mounts the file `source` over `target` (in the task's own mount namespace).
#[allow(unsafe_code)]
fn bind(source: &std::ffi::CStr, target: &std::ffi::CStr) -> io::Result<()> {
    use nix::libc;
    // SAFETY: a plain system call with NUL-terminated strings made before the fork.
    let mounted =
        unsafe { libc::mount(source.as_ptr(), target.as_ptr(), std::ptr::null(), libc::MS_BIND, std::ptr::null()) };
    Errno::result(mounted).map(drop).map_err(io::Error::from)
}

/// Enters a network namespace of its own and brings its loopback up: the task can serve and reach
/// itself on `127.0.0.1` and `::1`, and nothing else (not the machine's loopback services, its
/// networks, the cloud's metadata address or the internet). The namespace ends with the task's last
/// process.
#[allow(unsafe_code)]
fn own_network() -> io::Result<()> {
    use nix::libc;
    // SAFETY: plain system calls; `ifreq` is a plain C struct, zeroed, on the stack; the socket is
    // closed on every path.
    unsafe {
        if libc::unshare(libc::CLONE_NEWNET) != 0 {
            return Err(io::Error::last_os_error());
        }
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut ifr: libc::ifreq = std::mem::zeroed();
        for (to, from) in ifr.ifr_name.iter_mut().zip(b"lo") {
            *to = *from as libc::c_char;
        }
        let up = if libc::ioctl(fd, libc::SIOCGIFFLAGS as _, &mut ifr) == 0 {
            ifr.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
            libc::ioctl(fd, libc::SIOCSIFFLAGS as _, &ifr) == 0
        } else {
            false
        };
        let error = (!up).then(io::Error::last_os_error);
        libc::close(fd);
        error.map_or(Ok(()), Err)
    }
}

/// Enters a mount namespace of its own, which still receives the host's later mounts but sends
/// none back.
#[allow(unsafe_code)]
fn own_mounts() -> io::Result<()> {
    use nix::libc;
    // SAFETY: plain system calls with static, NUL-terminated strings and null pointers where allowed.
    unsafe {
        if libc::unshare(libc::CLONE_NEWNS) != 0
            || libc::mount(
                c"none".as_ptr(),
                c"/".as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_SLAVE,
                std::ptr::null(),
            ) != 0
        {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Mounts a new `/proc` with `hidepid=invisible` over the old one (in the task's own mount
/// namespace). Kernels before 5.8, where `/proc` options were shared by every mount of a pid
/// namespace (the host's too), refuse `invisible` before changing anything.
#[allow(unsafe_code)]
fn new_proc() -> io::Result<()> {
    use nix::libc;
    // SAFETY: a plain system call with static, NUL-terminated strings.
    let mounted = unsafe {
        libc::mount(
            c"proc".as_ptr(),
            c"/proc".as_ptr(),
            c"proc".as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            c"hidepid=invisible".as_ptr().cast(),
        )
    };
    Errno::result(mounted).map(drop).map_err(io::Error::from)
}

/// Gives the task its own [`PRIVATE_DIRS`] (`/run` only when `isolated`), each that exists on the
/// machine, in the task's own mount namespace: a folder of `sources` (the one at the same index,
/// for a [`Backing::Disk`]) or a fresh `tmpfs`. Each folder of `sources`, and the work directory
/// `dir` when it is inside one of them, is taken first (a detached copy of its mount, as a private
/// folder may hide it); `dir` is put back at the same path after making the folders of `carried`
/// (the path below the private folder, down to `dir`) in the new one.
#[allow(unsafe_code)]
fn private_dirs(
    dir: &std::ffi::CStr,
    carried: &[std::ffi::CString],
    sources: &[Option<std::ffi::CString>; PRIVATE_DIRS.len()],
    isolated: bool,
) -> io::Result<()> {
    use nix::libc;
    const OPEN_TREE_CLONE: libc::c_uint = 1;
    const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 4;
    // The detached trees: one per private folder, then the work directory's.
    let mut trees = [-1; PRIVATE_DIRS.len() + 1];
    // SAFETY: plain system calls with static or prepared NUL-terminated strings and descriptors
    // this function opened; each descriptor is closed on every path.
    unsafe {
        let take = |path: &std::ffi::CStr| -> io::Result<libc::c_int> {
            let flags = OPEN_TREE_CLONE | libc::O_CLOEXEC as libc::c_uint;
            let fd = Errno::result(libc::syscall(libc::SYS_open_tree, libc::AT_FDCWD, path.as_ptr(), flags))?;
            Ok(fd as libc::c_int)
        };
        let put = |tree: libc::c_int, at: &std::ffi::CStr| -> io::Result<()> {
            let empty = MOVE_MOUNT_F_EMPTY_PATH;
            Errno::result(libc::syscall(libc::SYS_move_mount, tree, c"".as_ptr(), libc::AT_FDCWD, at.as_ptr(), empty))?;
            Ok(())
        };
        let tmpfs = |at: &std::ffi::CStr, options: &std::ffi::CStr| -> io::Result<()> {
            let flags = libc::MS_NOSUID | libc::MS_NODEV;
            Errno::result(libc::mount(
                c"tmpfs".as_ptr(),
                at.as_ptr(),
                c"tmpfs".as_ptr(),
                flags,
                options.as_ptr().cast(),
            ))?;
            Ok(())
        };
        let mut work = || -> io::Result<()> {
            for (i, source) in sources.iter().enumerate() {
                if let Some(source) = source {
                    trees[i] = take(source)?;
                }
            }
            if !carried.is_empty() {
                trees[PRIVATE_DIRS.len()] = take(dir)?;
            }
            for (i, (path, backing, only_isolated)) in PRIVATE_DIRS.iter().enumerate() {
                if *only_isolated && !isolated {
                    continue;
                }
                let done = match backing {
                    Backing::Disk(_) if trees[i] >= 0 => put(trees[i], path),
                    // Its folder was not made (no allocation here, so no message of its own).
                    Backing::Disk(_) => Err(io::Error::from_raw_os_error(libc::EINVAL)),
                    Backing::Memory(options) => tmpfs(path, options),
                };
                // A folder the machine does not have is left out.
                if let Err(e) = done
                    && e.raw_os_error() != Some(libc::ENOENT)
                {
                    return Err(e);
                }
            }
            let tree = trees[PRIVATE_DIRS.len()];
            if tree < 0 {
                return Ok(());
            }
            for folder in carried {
                match Errno::result(libc::mkdir(folder.as_ptr(), 0o711)) {
                    Ok(_) | Err(Errno::EEXIST) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            put(tree, dir)
        };
        let result = work();
        for fd in trees.into_iter().filter(|fd| *fd >= 0) {
            libc::close(fd);
        }
        result
    }
}

/// The error a child of [`in_child`] returns once its work is done, before it would run anything.
const CHILD_DONE: i32 = nix::libc::ECHRNG;

/// Runs `work` in a forked child that stops with [`CHILD_DONE`] once it succeeded, so no program
/// runs and nothing changes in this process: `Ok` when it did, else why not. `work` runs after
/// fork: system calls only.
#[allow(unsafe_code)]
pub(crate) fn in_child(mut work: impl FnMut() -> io::Result<()> + Send + Sync + 'static) -> Result<(), String> {
    let mut child = std::process::Command::new("/");
    child.env_clear().stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
    // SAFETY: `work` makes only system calls, with static arguments or arguments made before the
    // fork (see `enter_then_switch`).
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut child, move || {
            work()?;
            Err(io::Error::from_raw_os_error(CHILD_DONE))
        });
    }
    match child.status() {
        Err(e) if e.raw_os_error() == Some(CHILD_DONE) => Ok(()),
        Err(e) => Err(e.to_string()),
        Ok(status) => Err(format!("the child ended with {status}")),
    }
}

/// Whether this process can give process tasks a network of their own, with `/run`, `/tmp`,
/// `/var/tmp` and `/dev/shm` of their own, for work directories inside `work_root` (see
/// [`TaskNetwork::Isolated`]): it takes root (`CAP_SYS_ADMIN`, with no seccomp profile refusing
/// `unshare`) and Linux 5.2 (`open_tree`, which mounts a task's folders on disk). Tried in a child,
/// exactly as a task would, so nothing changes here; `Err` says why not.
///
/// # Errors
/// Why not, as the system said it.
pub fn check_network_isolation(work_root: &Path) -> Result<(), String> {
    let nul = "the work root holds a NUL byte";
    let (dir, carried) = (c_path(work_root).ok_or(nul)?, carried_folders(work_root, true).ok_or(nul)?);
    // The work root itself stands in for a task's folders on disk.
    let sources = PRIVATE_DIRS.map(|(_, backing, _)| matches!(backing, Backing::Disk(_)).then(|| dir.clone()));
    in_child(move || {
        own_network()?;
        own_mounts()?;
        private_dirs(&dir, &carried, &sources, true)
    })
}

/// Whether this process may give tasks a `/proc` of their own (root with `CAP_SYS_ADMIN`, not
/// confined by a seccomp profile that refuses `unshare`, on Linux 5.8 or later): tried once, in a
/// child that stops once it has one, before it would run anything. Where it may not, task
/// users see every process of the machine, and a warning says why.
pub fn own_proc_works() -> bool {
    static WORKS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *WORKS.get_or_init(|| {
        match in_child(|| {
            own_mounts()?;
            new_proc()
        }) {
            Ok(()) => true,
            Err(why) => {
                tracing::warn!(
                    error = %why,
                    "tasks cannot get a /proc of their own here (it takes CAP_SYS_ADMIN and Linux 5.8): a task \
                     user can see the command lines of every process of the machine, other tasks' included"
                );
                false
            }
        }
    })
}

/// Sets the rlimits (and `no_new_privs`, for a task that runs as another user) in the child, after
/// fork and the uid switch, before exec.
#[allow(unsafe_code)]
fn set_limits(cmd: &mut Command, limits: Limits, other_user: bool, filter: Option<&'static [nix::libc::sock_filter]>) {
    let wanted: [(Resource, Option<u64>); 6] = [
        (Resource::RLIMIT_CPU, limits.cpu_seconds),
        (Resource::RLIMIT_AS, limits.memory_bytes),
        (Resource::RLIMIT_FSIZE, Some(limits.file_size_bytes)),
        (Resource::RLIMIT_NPROC, Some(limits.processes)),
        (Resource::RLIMIT_NOFILE, Some(limits.open_files)),
        (Resource::RLIMIT_CORE, Some(0)),
    ];
    // SAFETY: the closure runs in the forked child before exec, where only async-signal-safe functions may
    // be called. It calls only sigprocmask(2), close_range(2), getrlimit(2), setrlimit(2) and prctl(2)
    // (system calls, no locks), allocates nothing (the captured array is plain data, the filter was
    // made before the fork, errors are raw errno values) and touches no state shared with the parent.
    unsafe {
        cmd.pre_exec(move || {
            apply_limits(&wanted, other_user)?;
            // Last: the filter refuses what the steps before it use (mounts, namespaces).
            if let Some(program) = filter {
                crate::seccomp::install(program)?;
            }
            Ok(())
        });
    }
}

#[allow(unsafe_code)]
fn apply_limits(wanted: &[(Resource, Option<u64>)], other_user: bool) -> io::Result<()> {
    // A task starts with no signal blocked, whatever the worker's own mask (exec keeps it): a
    // program that waits for SIGTERM or SIGINT gets them. SAFETY: a zeroed `sigset_t` on the
    // stack, emptied, and plain system calls.
    unsafe {
        let mut none: nix::libc::sigset_t = std::mem::zeroed();
        nix::libc::sigemptyset(&mut none);
        nix::libc::sigprocmask(nix::libc::SIG_SETMASK, &none, std::ptr::null_mut());
    }
    // Descriptors the worker inherited without close-on-exec (from a supervisor or a wrapper; its
    // own all have it) do not reach the task: a socket among them would be a way out of an
    // isolated network. SAFETY: a plain system call. Linux before 5.11 refuses the flag, and then
    // nothing changes.
    unsafe {
        nix::libc::syscall(nix::libc::SYS_close_range, 3, nix::libc::c_uint::MAX, nix::libc::CLOSE_RANGE_CLOEXEC);
    }
    for &(resource, value) in wanted {
        if let Some(value) = value {
            let (_, hard) = getrlimit(resource)?;
            let value = value.min(hard);
            setrlimit(resource, value, value)?;
        }
    }
    // No set-user-id program or file capability lifts a task user above itself (sudo, su, ...). A
    // task that runs as the worker's own user already has all it has.
    if other_user {
        nix::sys::prctl::set_no_new_privs()?;
    }
    Ok(())
}

static ATTEMPT: AtomicU64 = AtomicU64::new(0);

/// Creates a fresh work directory (0700, owned by the task user) inside `root`.
fn create_workdir(root: &Path, run_as: Option<(u32, u32)>) -> io::Result<PathBuf> {
    if !root.exists() {
        std::fs::DirBuilder::new().recursive(true).mode(0o711).create(root)?;
    }
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    for _ in 0..100 {
        let n = ATTEMPT.fetch_add(1, Ordering::Relaxed);
        let dir = root.join(format!("attempt-{}-{n}-{nanos:08x}", std::process::id()));
        match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => {
                std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
                if let Some((uid, gid)) = run_as {
                    std::os::unix::fs::chown(&dir, Some(uid), Some(gid))?;
                }
                return Ok(dir);
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
    Err(io::Error::new(io::ErrorKind::AlreadyExists, "no free work directory name"))
}

fn create_output_file(path: &Path, run_as: Option<(u32, u32)>) -> io::Result<()> {
    std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)?;
    if let Some((uid, gid)) = run_as {
        std::os::unix::fs::chown(path, Some(uid), Some(gid))?;
    }
    Ok(())
}

/// Removes the work directory; when that fails and the worker is not root (a task may have made
/// directories unwritable for its own uid, which is the worker's), restores owner permissions and
/// retries. Root needs no permission to remove anything, and so never changes one: a path under a
/// directory a task wrote could be swapped for a symlink meanwhile.
fn remove_workdir(dir: &Path) {
    let _ = std::fs::remove_dir_all(sandbox_dir(dir));
    if std::fs::remove_dir_all(dir).is_ok() || !dir.exists() {
        return;
    }
    if nix::unistd::geteuid().is_root() {
        if let Err(e) = std::fs::remove_dir_all(dir) {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot remove a task work directory");
        }
        return;
    }
    fn unlock(dir: &Path) {
        let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
        if let Ok(entries) = std::fs::read_dir(dir) {
            for e in entries.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    unlock(&e.path());
                }
            }
        }
    }
    unlock(dir);
    if let Err(e) = std::fs::remove_dir_all(dir) {
        tracing::warn!(dir = %dir.display(), error = %e, "cannot remove a task work directory");
    }
}

/// Kills the process group, gives the task user back (killing whatever else runs as it) and removes the
/// work directory, in that order, so nothing of the task can still write there: thoroughly in
/// [`Cleanup::finish`], in place when dropped (the `execute` future was dropped mid-task).
struct Cleanup {
    pgid: Option<i32>,
    user: Option<TaskUser>,
    /// Whether every process of `user` was killed (none can start again).
    user_killed: bool,
    workdir: Option<PathBuf>,
}

impl Cleanup {
    /// Kills what the task started, once: every process of its task user (its process group
    /// among them, and what left the group), else its process group.
    async fn kill(&mut self) {
        let pgid = self.pgid.take();
        if let Some(user) = &self.user {
            if !self.user_killed {
                user.kill_processes().await;
            }
            self.user_killed = true;
        } else if let Some(pgid) = pgid {
            kill_group(pgid).await;
        }
    }

    async fn finish(&mut self) {
        self.kill().await;
        // Still holding the uid: nothing can write into the work directory while it goes.
        if let Some(dir) = self.workdir.take() {
            let _ = tokio::task::spawn_blocking(move || remove_workdir(&dir)).await;
        }
        if let Some(user) = self.user.take() {
            user.release().await;
        }
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Some(pgid) = self.pgid.take() {
            let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
        }
        let dir = self.workdir.take();
        match self.user.take() {
            Some(user) => user.release_on_thread(move || {
                if let Some(dir) = dir {
                    remove_workdir(&dir);
                }
            }),
            None => {
                if let Some(dir) = dir {
                    remove_workdir(&dir);
                }
            }
        }
    }
}

/// A uid of `users` for this attempt; while all are held, waits for one (saying so once), until the
/// deadline or a cancel.
async fn take_user(
    users: &TaskUsers,
    sink: &LogSink,
    deadline: Option<Instant>,
    cancel: &mut watch::Receiver<bool>,
) -> Result<TaskUser, (ExecOutcome, BTreeMap<String, String>)> {
    let mut said = false;
    loop {
        match users.try_acquire().await {
            Ok(Some(user)) => return Ok(user),
            Ok(None) => {}
            Err(e) => return Err(failed(format!("cannot take a task user: {e}"))),
        }
        if !said {
            let (first, last) = users.range();
            sink.system(&format!("waiting for a free task user: all of uids {first}-{last} are in use")).await;
            said = true;
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(20)) => {}
            _ = deadline_reached(deadline) => return Err((ExecOutcome::TimedOut, BTreeMap::new())),
            _ = cancelled(cancel) => return Err((ExecOutcome::Cancelled, BTreeMap::new())),
        }
    }
}

/// SIGKILLs the process group until no live (non-zombie) member is left. Zombies are ignored: orphans are
/// reaped by init (or not at all in some containers), and they run nothing.
pub(crate) async fn kill_group(pgid: i32) {
    if pgid <= 1 {
        return;
    }
    let start = Instant::now();
    loop {
        if let Err(Errno::ESRCH) = killpg(Pid::from_raw(pgid), Signal::SIGKILL) {
            return;
        }
        if live_group_members(pgid).is_empty() {
            return;
        }
        if start.elapsed() > KILL_PATIENCE {
            tracing::warn!(pgid, "process group still alive after SIGKILL");
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Pids of non-zombie processes in process group `pgid` (from `/proc`).
pub fn live_group_members(pgid: i32) -> Vec<i32> {
    let mut pids = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else { return pids };
    for e in entries.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else { continue };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
        // "pid (comm) state ppid pgrp ...": comm may contain anything, so parse after the last ')'.
        let Some((_, rest)) = stat.rsplit_once(')') else { continue };
        let mut fields = rest.split_whitespace();
        let state = fields.next();
        let pgrp = fields.nth(1).and_then(|f| f.parse::<i32>().ok());
        if pgrp == Some(pgid) && !matches!(state, Some("Z" | "X")) {
            pids.push(pid);
        }
    }
    pids
}
