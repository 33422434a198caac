//! `sluice` as PID 1 (a container started without an init): the first process stays a minimal
//! init. It starts `sluice` again, with the same arguments and environment, as its one child,
//! passes on the signals a container receives, reaps every process that ends up re-parented to it
//! (what a worker kills after a task, when the task's processes had left it), and ends with its
//! child's status. Without it, each of those would stay a zombie for good.

use std::os::unix::process::CommandExt;
use std::process::ExitCode;

use nix::sys::signal::{SigSet, Signal, kill};
use nix::unistd::Pid;

/// The signals passed on to the child.
const FORWARDED: [Signal; 6] =
    [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP, Signal::SIGQUIT, Signal::SIGUSR1, Signal::SIGUSR2];

/// Whether this process is the first of its pid namespace.
pub fn is_pid_1() -> bool {
    std::process::id() == 1
}

/// The signals this init waits for, blocked meanwhile.
fn waited() -> SigSet {
    let mut set = SigSet::empty();
    set.add(Signal::SIGCHLD);
    for s in FORWARDED {
        set.add(s);
    }
    set
}

/// Unblocks what an init blocked: a child inherits the mask, and `sluice` proper must receive
/// SIGTERM (its drain) and SIGCHLD. Called before the runtime starts.
pub fn unblock_signals() {
    let _ = waited().thread_unblock();
}

/// Runs as the init of the namespace until the child `sluice` ends; returns its status (a child
/// ended by a signal gives 128 + the signal's number, as a shell reports it).
pub fn run() -> ExitCode {
    let waited = waited();
    // Blocked before the child exists, so no signal is missed; the child inherits the mask and
    // unblocks them itself ([`unblock_signals`]).
    if let Err(e) = waited.thread_block() {
        eprintln!("error: sluice as PID 1 cannot block signals: {e}");
        return ExitCode::FAILURE;
    }
    let mut args = std::env::args_os();
    let name = args.next().unwrap_or_else(|| "sluice".into());
    // This very program, even where its file was replaced meanwhile.
    let child = match std::process::Command::new("/proc/self/exe").arg0(name).args(args).spawn() {
        Ok(child) => Pid::from_raw(child.id() as i32),
        Err(e) => {
            eprintln!("error: sluice as PID 1 cannot start sluice: {e}");
            return ExitCode::FAILURE;
        }
    };
    loop {
        match waited.wait() {
            Ok(Signal::SIGCHLD) => {
                if let Some(code) = reap(child) {
                    return ExitCode::from(code);
                }
            }
            // (On a terminal, Ctrl-C reaches the child directly too: it shares the foreground
            // process group, so it gets SIGINT twice, which stops it at once either way.)
            Ok(signal) => {
                let _ = kill(child, signal);
            }
            Err(_) => {}
        }
    }
}

/// Reaps every process that has ended; returns the child's status once it is among them. (The
/// raw status is read, so a process ended by any signal, a real-time one too, is reaped alike.)
#[allow(unsafe_code)]
fn reap(child: Pid) -> Option<u8> {
    use nix::libc;
    let mut ended = None;
    loop {
        let mut status: libc::c_int = 0;
        // SAFETY: a plain system call writing into a local integer.
        let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
        if pid == 0 || (pid < 0 && nix::errno::Errno::last() != nix::errno::Errno::EINTR) {
            return ended;
        }
        if pid == child.as_raw() {
            if libc::WIFEXITED(status) {
                ended = Some(libc::WEXITSTATUS(status).clamp(0, 255) as u8);
            } else if libc::WIFSIGNALED(status) {
                ended = Some(128u8.saturating_add(libc::WTERMSIG(status).clamp(0, 127) as u8));
            }
        }
    }
}
