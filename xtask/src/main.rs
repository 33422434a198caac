//! `cargo xtask`: the project's developer commands.
//!
//! - `cargo xtask run [-- <sluice serve flags>]`: build and start Sluice on http://127.0.0.1:8080
//!   (SQLite in ./sluice-data, in-process dispatch).
//! - `cargo xtask test`: formatting, lints, and the whole test suite on SQLite and on PostgreSQL.
//! - `cargo xtask bench`: the benchmarks, with the machine's commit floor first.

use std::{
    env,
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use anyhow::{Context, bail};

fn main() -> ExitCode {
    let args: Vec<String> = env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("run") => run(&args[1..]),
        Some("test") => test(),
        Some("bench") => bench(),
        _ => {
            eprintln!("usage: cargo xtask <run|test|bench>");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The workspace: the parent of xtask's folder, as `cargo run` names it when it starts this
/// program. The folder it was built in is only the fallback: two checkouts sharing a target
/// folder share this binary (cargo finds it up to date for either), and each must work on its own
/// files.
fn root() -> PathBuf {
    let manifest =
        env::var_os("CARGO_MANIFEST_DIR").map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from);
    manifest.parent().map(Path::to_path_buf).unwrap_or_else(|| ".".into())
}

fn cargo() -> Command {
    let mut c = Command::new(env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(root());
    c
}

fn status(mut c: Command, what: &str) -> anyhow::Result<()> {
    eprintln!("==> {what}");
    let s = c.status().with_context(|| format!("starting {what}"))?;
    if !s.success() {
        bail!("{what} failed ({s})");
    }
    Ok(())
}

fn target_dir() -> PathBuf {
    env::var_os("CARGO_TARGET_DIR").map_or_else(|| root().join("target"), PathBuf::from)
}

fn run(extra: &[String]) -> anyhow::Result<()> {
    let mut build = cargo();
    build.args(["build", "--release", "-p", "sluice"]);
    status(build, "cargo build --release -p sluice")?;
    let bin = target_dir().join("release").join("sluice");
    let mut serve = Command::new(&bin);
    serve.current_dir(root()).arg("serve").args(extra.iter().filter(|a| *a != "--"));
    status(serve, "sluice serve")
}

fn postgres_url() -> String {
    env::var("SLUICE_TEST_POSTGRES_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into())
}

fn test() -> anyhow::Result<()> {
    let mut fmt = cargo();
    fmt.args(["fmt", "--all", "--", "--check"]);
    status(fmt, "cargo fmt --check")?;
    let mut clippy = cargo();
    clippy.args(["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"]);
    status(clippy, "cargo clippy -D warnings")?;
    let suites = || {
        let mut sqlite = cargo();
        sqlite.args(["test", "--workspace", "--all-targets"]).env("SLUICE_TEST_DATABASE", "sqlite");
        status(sqlite, "tests on SQLite (all crates)")?;
        let mut pg = cargo();
        pg.args(["test", "-p", "sluice-backend", "--test", "api"])
            .env("SLUICE_TEST_DATABASE", "postgres")
            .env("SLUICE_TEST_POSTGRES_URL", postgres_url());
        status(pg, "API tests on PostgreSQL")
    };
    // The suites' PostgreSQL databases (the process tests make some on either run) go, whether
    // they passed or not.
    let result = suites();
    drop_test_databases();
    result?;
    eprintln!("==> all test suites passed (SQLite and PostgreSQL)");
    Ok(())
}

/// Drops the per-test PostgreSQL databases (`sluice_test_*`) when `psql` is at hand.
fn drop_test_databases() {
    let url = format!("{}/postgres", postgres_url());
    let Ok(out) = Command::new("psql")
        .args([url.as_str(), "-Atc", "SELECT datname FROM pg_database WHERE datname LIKE 'sluice_test_%'"])
        .output()
    else {
        return;
    };
    for name in String::from_utf8_lossy(&out.stdout).lines().filter(|n| !n.is_empty()) {
        let _ = Command::new("psql")
            .args([url.as_str(), "-qc", &format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)")])
            .status();
    }
}

fn bench() -> anyhow::Result<()> {
    let mut build = cargo();
    build.args(["build", "--release", "-p", "sluice", "-p", "sluice-backend", "--bins", "--examples"]);
    status(build, "release build")?;
    let bin = target_dir().join("release");
    let mut floor = Command::new(bin.join("examples").join("http_bench"));
    floor.args(["floor", "--postgres", &postgres_url()]);
    status(floor, "commit floor")?;
    status(Command::new(bin.join("examples").join("cedar_bench")), "Cedar decision latency")?;
    for mode in ["embedded", "redis"] {
        let mut engine = Command::new(bin.join("examples").join("engine_bench"));
        let sluice = bin.join("sluice");
        let redis = env::var("SLUICE_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
        engine.args([
            "--sluice",
            &sluice.to_string_lossy(),
            "--mode",
            mode,
            "--postgres",
            &postgres_url(),
            "--redis",
            &redis,
        ]);
        status(engine, &format!("engine workloads ({mode})"))?;
    }
    for db in ["sqlite", "postgres"] {
        let mut http = Command::new(bin.join("examples").join("http_bench"));
        http.args([
            "http",
            "--db",
            db,
            "--postgres",
            &postgres_url(),
            "--sluice",
            &bin.join("sluice").to_string_lossy(),
        ]);
        status(http, &format!("authorized GET pipelines on {db}"))?;
    }
    Ok(())
}
