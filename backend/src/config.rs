//! Configuration: defaults, then an optional `sluice.toml`, then `SLUICE_*` environment variables
//! and command-line flags (flags win over the environment). One typed struct.

use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::Deserialize;

/// Command-line flags and environment variables; every key is documented in `sluice serve --help`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ConfigArgs {
    /// Configuration file (TOML, keys as below without the SLUICE_ prefix, lower case).
    /// Default: ./sluice.toml when it exists.
    #[arg(long, env = "SLUICE_CONFIG", global = true)]
    pub config: Option<PathBuf>,
    /// Address to listen on [default: 127.0.0.1:8080].
    #[arg(long, env = "SLUICE_BIND", global = true)]
    pub bind: Option<String>,
    /// Folder for the embedded database, signing keys and other runtime data [default: ./sluice-data].
    #[arg(long, env = "SLUICE_DATA_DIR", global = true)]
    pub data_dir: Option<PathBuf>,
    /// Database URL: postgres://user@host/db for PostgreSQL; unset means SQLite in the data folder.
    #[arg(long, env = "SLUICE_DATABASE_URL", global = true)]
    pub database_url: Option<String>,
    /// Redis URL for the task queue; unset means in-process dispatch.
    #[arg(long, env = "SLUICE_REDIS_URL", global = true)]
    pub redis_url: Option<String>,
    /// Prefix of every Redis key of this deployment [default: sluice].
    #[arg(long, env = "SLUICE_REDIS_PREFIX", global = true)]
    pub redis_prefix: Option<String>,
    /// Run a worker inside `sluice serve` [default: true without Redis, false with Redis].
    #[arg(long, env = "SLUICE_WITH_WORKER", global = true, num_args = 0..=1, default_missing_value = "true")]
    pub with_worker: Option<bool>,
    /// Public base URL, used in invitation links and as the JWT issuer [default: http://<bind>].
    #[arg(long, env = "SLUICE_PUBLIC_URL", global = true)]
    pub public_url: Option<String>,
    /// Whether anyone may create a tenant with POST /api/v1/signup [default: true].
    #[arg(long, env = "SLUICE_SIGNUP_ENABLED", global = true)]
    pub signup_enabled: Option<bool>,
    /// Longest allowed API token lifetime, in days [default: 365].
    #[arg(long, env = "SLUICE_TOKEN_MAX_DAYS", global = true)]
    pub token_max_days: Option<u32>,
    /// JSON file with the JWT signing keys [default: <data dir>/jwt-keys.json, generated on first start].
    #[arg(long, env = "SLUICE_JWT_KEYS_FILE", global = true)]
    pub jwt_keys_file: Option<PathBuf>,
    /// Database connection pool size [default: 16].
    #[arg(long, env = "SLUICE_DB_MAX_CONNECTIONS", global = true)]
    pub db_max_connections: Option<u32>,
    /// Log format: text or json [default: text].
    #[arg(long, env = "SLUICE_LOG_FORMAT", global = true)]
    pub log_format: Option<String>,
    /// Trust X-Forwarded-For from a reverse proxy for the client address [default: false].
    #[arg(long, env = "SLUICE_TRUST_PROXY", global = true)]
    pub trust_proxy: Option<bool>,
    /// How many tasks a worker (the embedded one or `sluice worker`) runs at once [default: 4].
    #[arg(long, env = "SLUICE_WORKER_SLOTS", global = true)]
    pub worker_slots: Option<usize>,
    /// Seconds a worker (`sluice worker`, or `sluice serve`'s embedded one) stopped by SIGTERM or
    /// Ctrl-C lets its tasks in flight run on; then it kills those still running and gives them
    /// back, to run again at once elsewhere (or at the next start) without using a retry
    /// (1-3600) [default: 30].
    #[arg(long, env = "SLUICE_WORKER_DRAIN_SECONDS", global = true)]
    pub worker_drain_seconds: Option<u64>,
    /// Most tasks of one tenant running at once across all workers; 0 for no limit [default: 64].
    #[arg(long, env = "SLUICE_TENANT_MAX_RUNNING_TASKS", global = true)]
    pub tenant_max_running_tasks: Option<usize>,
    /// This worker's name, unique among live workers (a second process with the name of a live
    /// worker refuses to start) [default: <host>-<pid>-<random>].
    #[arg(long, env = "SLUICE_WORKER_NAME", global = true)]
    pub worker_name: Option<String>,
    /// Labels of this worker, comma-separated (at most 4, each 1-63 of A-Z a-z 0-9 . _ -); a task
    /// with `runs_on: [..]` runs only on a worker that has all its labels [default: none].
    #[arg(long, env = "SLUICE_WORKER_LABELS", global = true)]
    pub worker_labels: Option<String>,
    /// CPUs this worker offers to tasks that declare `resources.cpu` (fractions allowed)
    /// [default: the machine's CPUs].
    #[arg(long, env = "SLUICE_WORKER_CPU", global = true)]
    pub worker_cpu: Option<String>,
    /// Memory this worker offers to tasks that declare `resources.memory`, e.g. 4GiB
    /// [default: the machine's memory].
    #[arg(long, env = "SLUICE_WORKER_MEMORY", global = true)]
    pub worker_memory: Option<String>,
    /// Slug of the tenant this worker belongs to: it executes only that tenant's tasks that ask
    /// for `runs_on: [self-hosted, ..]`, and needs SLUICE_WORKER_TOKEN [default: a shared worker].
    #[arg(long, env = "SLUICE_WORKER_TENANT", global = true)]
    pub worker_tenant: Option<String>,
    /// An API token of that tenant whose groups may register workers (`worker.register`; by
    /// default admins).
    #[arg(long, env = "SLUICE_WORKER_TOKEN", global = true, hide_env_values = true)]
    pub worker_token: Option<String>,
    /// Key that encrypts tenant secrets: base64 of 32 random bytes (`openssl rand -base64 32`), the
    /// same on every server of an installation [default: <data dir>/secrets.key, generated on first
    /// start with the embedded database; required with PostgreSQL].
    #[arg(long, env = "SLUICE_SECRETS_KEY", global = true, hide_env_values = true)]
    pub secrets_key: Option<String>,
    /// Uids a worker running as root gives its process tasks, one each, as `FIRST-LAST`: no other
    /// user of the machine may have one, since every process of a uid is killed around each task
    /// [default: 2000000000-2000000999].
    #[arg(long, env = "SLUICE_TASK_UIDS", global = true)]
    pub task_uids: Option<String>,
    /// Folder of the locks through which the workers of one machine share `SLUICE_TASK_UIDS`
    /// [default: /run/sluice/task-uids].
    #[arg(long, env = "SLUICE_TASK_UID_LOCKS", global = true)]
    pub task_uid_locks: Option<PathBuf>,
    /// The network process tasks reach: `host` (the machine's) or `none` (only each task's own
    /// loopback; takes a worker running as root) [default: host].
    #[arg(long, env = "SLUICE_TASK_NETWORK", global = true)]
    pub task_network: Option<String>,
    /// The system calls process tasks of a task user may make: `restricted` (namespaces, mounts,
    /// keyrings, bpf, io_uring and the like refused) or `all` [default: restricted].
    #[arg(long, env = "SLUICE_TASK_SYSCALLS", global = true)]
    pub task_syscalls: Option<String>,
}

/// The same keys, as read from `sluice.toml`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    bind: Option<String>,
    data_dir: Option<PathBuf>,
    database_url: Option<String>,
    redis_url: Option<String>,
    redis_prefix: Option<String>,
    with_worker: Option<bool>,
    public_url: Option<String>,
    signup_enabled: Option<bool>,
    token_max_days: Option<u32>,
    jwt_keys_file: Option<PathBuf>,
    db_max_connections: Option<u32>,
    log_format: Option<String>,
    trust_proxy: Option<bool>,
    worker_slots: Option<usize>,
    worker_drain_seconds: Option<u64>,
    tenant_max_running_tasks: Option<usize>,
    worker_name: Option<String>,
    worker_labels: Option<String>,
    worker_cpu: Option<String>,
    worker_memory: Option<String>,
    worker_tenant: Option<String>,
    worker_token: Option<String>,
    secrets_key: Option<String>,
    task_uids: Option<String>,
    task_uid_locks: Option<PathBuf>,
    task_network: Option<String>,
    task_syscalls: Option<String>,
}

/// The resolved configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Listen address.
    pub bind: String,
    /// Runtime data folder.
    pub data_dir: PathBuf,
    /// Database URL (SQLite in the data folder when not configured).
    pub database_url: String,
    /// Redis URL, if any.
    pub redis_url: Option<String>,
    /// Prefix of this deployment's Redis keys.
    pub redis_prefix: String,
    /// Whether `sluice serve` runs a worker too.
    pub with_worker: bool,
    /// Public base URL.
    pub public_url: String,
    /// Self-service signup on or off.
    pub signup_enabled: bool,
    /// Longest API token lifetime in days.
    pub token_max_days: u32,
    /// Signing keys file.
    pub jwt_keys_file: PathBuf,
    /// Pool size.
    pub db_max_connections: u32,
    /// `text` or `json`.
    pub log_format: String,
    /// Whether to trust X-Forwarded-For.
    pub trust_proxy: bool,
    /// Concurrent tasks of a worker (the embedded one or `sluice worker`).
    pub worker_slots: usize,
    /// How long a worker stopped by SIGTERM lets its tasks in flight run on before it gives
    /// them back.
    pub worker_drain: std::time::Duration,
    /// Most tasks of one tenant running at once (0: no limit).
    pub tenant_max_running_tasks: usize,
    /// This worker's identity, labels, capacity and owner.
    pub worker: WorkerConfig,
    /// Base64 key for tenant secrets, if configured (else the key file in the data folder).
    pub secrets_key: Option<String>,
    /// First uid and number of uids process tasks run as (when the worker is root).
    pub task_uids: (u32, u32),
    /// Folder of the locks that hold task uids.
    pub task_uid_locks: PathBuf,
    /// The network process tasks reach.
    pub task_network: sluice_worker::TaskNetwork,
    /// The system calls process tasks of a task user may make.
    pub task_syscalls: sluice_worker::TaskSyscalls,
}

impl Config {
    /// Whether the database is the embedded SQLite file.
    pub fn is_embedded(&self) -> bool {
        self.database_url.starts_with("sqlite:")
    }

    /// Resolves the configuration from flags/environment and the optional file.
    pub fn load(args: &ConfigArgs) -> anyhow::Result<Self> {
        let file = match &args.config {
            Some(path) => read_file(path)?,
            None if Path::new("sluice.toml").exists() => read_file(Path::new("sluice.toml"))?,
            None => FileConfig::default(),
        };
        let bind = args.bind.clone().or(file.bind).unwrap_or_else(|| "127.0.0.1:8080".into());
        let data_dir = args.data_dir.clone().or(file.data_dir).unwrap_or_else(|| "sluice-data".into());
        let database_url = args
            .database_url
            .clone()
            .or(file.database_url)
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| crate::store::sqlite_url(&data_dir));
        let public_url = args
            .public_url
            .clone()
            .or(file.public_url)
            .unwrap_or_else(|| format!("http://{bind}"))
            .trim_end_matches('/')
            .to_owned();
        let log_format = args.log_format.clone().or(file.log_format).unwrap_or_else(|| "text".into());
        anyhow::ensure!(
            log_format == "text" || log_format == "json",
            "SLUICE_LOG_FORMAT must be text or json, not {log_format:?}"
        );
        let token_max_days = args.token_max_days.or(file.token_max_days).unwrap_or(365);
        anyhow::ensure!(token_max_days >= 1, "SLUICE_TOKEN_MAX_DAYS must be at least 1");
        let redis_url = args.redis_url.clone().or(file.redis_url).filter(|s| !s.is_empty());
        let redis_prefix = args
            .redis_prefix
            .clone()
            .or(file.redis_prefix)
            .filter(|s| !s.trim().is_empty())
            .unwrap_or_else(|| "sluice".into());
        let with_worker = args.with_worker.or(file.with_worker).unwrap_or(redis_url.is_none());
        let worker_slots = args.worker_slots.or(file.worker_slots).unwrap_or(4).max(1);
        let worker_drain_seconds = args.worker_drain_seconds.or(file.worker_drain_seconds).unwrap_or(30);
        anyhow::ensure!(
            (1..=3600).contains(&worker_drain_seconds),
            "SLUICE_WORKER_DRAIN_SECONDS must be 1 to 3600, not {worker_drain_seconds}"
        );
        let task_uids = parse_task_uids(args.task_uids.as_deref().or(file.task_uids.as_deref()))?;
        anyhow::ensure!(
            u64::from(task_uids.1) >= worker_slots as u64,
            "SLUICE_TASK_UIDS holds {} uids, fewer than the worker's {worker_slots} slots",
            task_uids.1
        );
        let task_network = match args.task_network.as_deref().or(file.task_network.as_deref()) {
            None => sluice_worker::TaskNetwork::Host,
            Some(v) => sluice_worker::TaskNetwork::parse(v).map_err(|e| anyhow::anyhow!("SLUICE_TASK_NETWORK: {e}"))?,
        };
        let task_syscalls = match args.task_syscalls.as_deref().or(file.task_syscalls.as_deref()) {
            None => sluice_worker::TaskSyscalls::Restricted,
            Some(v) => {
                sluice_worker::TaskSyscalls::parse(v).map_err(|e| anyhow::anyhow!("SLUICE_TASK_SYSCALLS: {e}"))?
            }
        };
        Ok(Self {
            jwt_keys_file: args
                .jwt_keys_file
                .clone()
                .or(file.jwt_keys_file)
                .unwrap_or_else(|| data_dir.join("jwt-keys.json")),
            bind,
            data_dir,
            database_url,
            redis_url,
            redis_prefix,
            with_worker,
            public_url,
            signup_enabled: args.signup_enabled.or(file.signup_enabled).unwrap_or(true),
            token_max_days,
            db_max_connections: args.db_max_connections.or(file.db_max_connections).unwrap_or(16).max(1),
            log_format,
            trust_proxy: args.trust_proxy.or(file.trust_proxy).unwrap_or(false),
            worker_slots,
            worker_drain: std::time::Duration::from_secs(worker_drain_seconds),
            tenant_max_running_tasks: args.tenant_max_running_tasks.or(file.tenant_max_running_tasks).unwrap_or(64),
            worker: WorkerConfig::resolve(
                args.worker_name.clone().or(file.worker_name),
                args.worker_labels.clone().or(file.worker_labels),
                args.worker_cpu.clone().or(file.worker_cpu),
                args.worker_memory.clone().or(file.worker_memory),
                args.worker_tenant.clone().or(file.worker_tenant),
                args.worker_token.clone().or(file.worker_token),
            )?,
            secrets_key: args.secrets_key.clone().or(file.secrets_key).filter(|s| !s.trim().is_empty()),
            task_uids,
            task_uid_locks: args
                .task_uid_locks
                .clone()
                .or(file.task_uid_locks)
                .unwrap_or_else(|| sluice_worker::DEFAULT_LOCK_DIR.into()),
            task_network,
            task_syscalls,
        })
    }
}

/// The uids tasks run as by default: far above those distributions give people, services and
/// containers (systemd's table of uid ranges leaves 1879048192-2147352575 unused).
pub const DEFAULT_TASK_UIDS: (u32, u32) = (2_000_000_000, 1000);

/// Parses `FIRST-LAST` into the first uid and the number of uids.
fn parse_task_uids(value: Option<&str>) -> anyhow::Result<(u32, u32)> {
    let Some(value) = value.map(str::trim).filter(|v| !v.is_empty()) else { return Ok(DEFAULT_TASK_UIDS) };
    let bad = || anyhow::anyhow!("SLUICE_TASK_UIDS must be FIRST-LAST, two uids with FIRST <= LAST, not {value:?}");
    let (first, last) = value.split_once('-').ok_or_else(bad)?;
    let first: u32 = first.trim().parse().map_err(|_| bad())?;
    let last: u32 = last.trim().parse().map_err(|_| bad())?;
    anyhow::ensure!(first <= last, bad());
    let count = (last - first).checked_add(1).ok_or_else(bad)?;
    sluice_worker::TaskUsers::check_range(first, count).map_err(|e| anyhow::anyhow!("SLUICE_TASK_UIDS: {e}"))?;
    Ok((first, count))
}

/// Most labels one worker may have: it consumes one queue per subset of its labels (16 at 4).
pub const MAX_WORKER_LABELS: usize = 4;

/// The label that sends a task to its tenant's own workers (`runs_on: [self-hosted, ..]`).
pub const SELF_HOSTED: &str = "self-hosted";

/// What a worker process is: name, labels, the capacity it offers, and whose it is.
#[derive(Clone, Default)]
pub struct WorkerConfig {
    /// The configured name (`None`: a unique generated one).
    pub name: Option<String>,
    /// Labels, sorted, without duplicates.
    pub labels: Vec<String>,
    /// CPU capacity in thousandths of a CPU.
    pub cpu_millis: u64,
    /// Memory capacity in bytes.
    pub memory_bytes: u64,
    /// Slug of the owning tenant (`None`: a shared worker).
    pub tenant: Option<String>,
    /// The tenant's API token that registers the worker.
    pub token: Option<String>,
}

impl std::fmt::Debug for WorkerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerConfig")
            .field("name", &self.name)
            .field("labels", &self.labels)
            .field("cpu_millis", &self.cpu_millis)
            .field("memory_bytes", &self.memory_bytes)
            .field("tenant", &self.tenant)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// Whether `name` is a valid worker name: 1-200 of A-Z a-z 0-9 . _ - : @, starting with a letter
/// or digit.
pub fn is_valid_worker_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 200
        && b[0].is_ascii_alphanumeric()
        && b.iter().all(|c| c.is_ascii_alphanumeric() || b"._-:@".contains(c))
}

/// Whether `label` is a valid worker label: 1-63 of A-Z a-z 0-9 . _ -, starting with a letter or
/// digit.
pub fn is_valid_worker_label(label: &str) -> bool {
    let b = label.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b[0].is_ascii_alphanumeric()
        && b.iter().all(|c| c.is_ascii_alphanumeric() || b"._-".contains(c))
}

impl WorkerConfig {
    fn resolve(
        name: Option<String>,
        labels: Option<String>,
        cpu: Option<String>,
        memory: Option<String>,
        tenant: Option<String>,
        token: Option<String>,
    ) -> anyhow::Result<Self> {
        let name = name.map(|n| n.trim().to_owned()).filter(|n| !n.is_empty());
        if let Some(n) = &name {
            anyhow::ensure!(
                is_valid_worker_name(n),
                "SLUICE_WORKER_NAME {n:?} is not a valid worker name: use 1 to 200 letters, digits or . _ - : @, \
                 starting with a letter or digit"
            );
        }
        let mut list: Vec<String> = labels
            .as_deref()
            .unwrap_or_default()
            .split(',')
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_owned)
            .collect();
        for l in &list {
            anyhow::ensure!(
                is_valid_worker_label(l),
                "SLUICE_WORKER_LABELS: {l:?} is not a valid label: use 1 to 63 letters, digits or . _ -, starting \
                 with a letter or digit"
            );
            anyhow::ensure!(
                l != SELF_HOSTED,
                "SLUICE_WORKER_LABELS: {SELF_HOSTED:?} is implied for a tenant's own worker (SLUICE_WORKER_TENANT) \
                 and not allowed otherwise"
            );
        }
        list.sort();
        list.dedup();
        anyhow::ensure!(
            list.len() <= MAX_WORKER_LABELS,
            "SLUICE_WORKER_LABELS has {} labels; a worker may have at most {MAX_WORKER_LABELS} (it consumes one \
             queue per combination of its labels)",
            list.len()
        );
        let cpu_millis = match cpu.as_deref().map(str::trim).filter(|c| !c.is_empty()) {
            None => 1000 * std::thread::available_parallelism().map_or(1, |n| n.get() as u64),
            Some(text) => {
                let cpus: f64 = text
                    .parse()
                    .ok()
                    .filter(|c: &f64| c.is_finite() && *c >= 0.001 && *c <= 100_000.0)
                    .ok_or_else(|| {
                        anyhow::anyhow!("SLUICE_WORKER_CPU {text:?} is not a number of CPUs between 0.001 and 100000")
                    })?;
                (cpus * 1000.0).round() as u64
            }
        };
        let memory_bytes = match memory.as_deref().map(str::trim).filter(|m| !m.is_empty()) {
            None => machine_memory(),
            Some(text) => sluice_domain::MemorySize::parse(text)
                .map_err(|e| anyhow::anyhow!("SLUICE_WORKER_MEMORY: {e}"))?
                .bytes(),
        };
        let tenant = tenant.map(|t| t.trim().to_owned()).filter(|t| !t.is_empty());
        let token = token.map(|t| t.trim().to_owned()).filter(|t| !t.is_empty());
        if let Some(t) = &tenant {
            anyhow::ensure!(sluice_domain::Slug::parse(t).is_ok(), "SLUICE_WORKER_TENANT {t:?} is not a tenant slug");
            anyhow::ensure!(
                token.is_some(),
                "SLUICE_WORKER_TENANT is set: the worker needs SLUICE_WORKER_TOKEN, an API token of tenant {t}"
            );
        }
        Ok(Self { name, labels: list, cpu_millis, memory_bytes, tenant, token })
    }
}

/// The machine's memory in bytes (`/proc/meminfo`; 1 GiB when unknown).
fn machine_memory() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
            let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
            Some(kib * 1024)
        })
        .unwrap_or(1 << 30)
}

fn read_file(path: &Path) -> anyhow::Result<FileConfig> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_uids_are_a_range_clear_of_system_uids() {
        assert_eq!(parse_task_uids(None).expect("valid"), DEFAULT_TASK_UIDS);
        assert_eq!(parse_task_uids(Some(" ")).expect("valid"), DEFAULT_TASK_UIDS);
        assert_eq!(parse_task_uids(Some("200000-200009")).expect("valid"), (200_000, 10));
        assert_eq!(parse_task_uids(Some("70000-70000")).expect("valid"), (70_000, 1));
        for (value, says) in [
            ("200000", "FIRST-LAST"),
            ("b-c", "FIRST-LAST"),
            ("200009-200000", "FIRST-LAST"),
            ("-1-5", "FIRST-LAST"),
            ("500-2000", "system uid"),
            ("60000-70000", "system uid"),
            ("4294967290-4294967295", "largest uid"),
        ] {
            let e = parse_task_uids(Some(value)).expect_err(value).to_string();
            assert!(e.contains(says), "{value}: {e}");
        }
    }

    #[test]
    fn the_drain_lasts_thirty_seconds_unless_set_within_an_hour() {
        let args = |drain: Option<u64>| ConfigArgs {
            config: Some("/dev/null".into()),
            worker_drain_seconds: drain,
            ..ConfigArgs::default()
        };
        let load = |drain| Config::load(&args(drain));
        assert_eq!(load(None).expect("valid").worker_drain, std::time::Duration::from_secs(30));
        assert_eq!(load(Some(1)).expect("valid").worker_drain, std::time::Duration::from_secs(1));
        assert_eq!(load(Some(3600)).expect("valid").worker_drain, std::time::Duration::from_secs(3600));
        for bad in [0, 3601] {
            let e = load(Some(bad)).expect_err("out of range").to_string();
            assert_eq!(e, format!("SLUICE_WORKER_DRAIN_SECONDS must be 1 to 3600, not {bad}"));
        }
    }
}
