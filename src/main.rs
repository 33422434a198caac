//! The `sluice` binary: one program, several roles. Only the command line lives here.

use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use sluice_backend::{Application, Config, ConfigArgs, admin, auth::jwt, telemetry};

mod init;

#[derive(Parser)]
#[command(name = "sluice", version, about = "Sluice: multi-tenant task pipelines with approval gates")]
struct Cli {
    #[command(flatten)]
    config: ConfigArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the API (migrates the database first).
    Serve,
    /// Execute tasks: take dispatches from Redis (SLUICE_REDIS_URL) until SIGTERM or Ctrl-C.
    Worker {
        /// This worker's name, unique among live workers (same as SLUICE_WORKER_NAME).
        #[arg(long)]
        name: Option<String>,
        /// Run as a tenant's own worker (same as SLUICE_WORKER_TENANT; needs SLUICE_WORKER_TOKEN).
        #[arg(long)]
        tenant: Option<String>,
    },
    /// Apply database migrations and exit.
    Migrate,
    /// Operator commands.
    #[command(subcommand)]
    Admin(AdminCommand),
    /// Audit log commands.
    #[command(subcommand)]
    Audit(AuditCommand),
}

#[derive(Subcommand)]
enum AdminCommand {
    /// Create a tenant and its first admin (prints a generated password when none is given).
    CreateTenant {
        /// Tenant slug.
        #[arg(long)]
        slug: String,
        /// Display name (default: the slug).
        #[arg(long)]
        name: Option<String>,
        /// Email of the first admin (an existing user is reused).
        #[arg(long)]
        admin_email: String,
        /// Password for a new admin user (or SLUICE_ADMIN_PASSWORD).
        #[arg(long, env = "SLUICE_ADMIN_PASSWORD")]
        admin_password: Option<String>,
    },
    /// Disable a user: every session and API token of theirs stops working at once.
    DisableUser {
        /// The user's email.
        #[arg(long)]
        email: String,
    },
    /// Set how many tasks of one tenant may run at once, overriding
    /// SLUICE_TENANT_MAX_RUNNING_TASKS for it (0: no limit).
    SetTenantLimit {
        /// Tenant slug.
        #[arg(long)]
        tenant: String,
        /// Most running tasks.
        #[arg(long, conflicts_with = "default", required_unless_present = "default")]
        max_running_tasks: Option<u32>,
        /// Go back to the configured default.
        #[arg(long)]
        default: bool,
    },
    /// Add a new JWT signing key; the old ones keep verifying for the grace period.
    RotateSigningKey {
        /// Grace period in minutes for the previous keys (at least the token lifetime).
        #[arg(long, default_value_t = 60)]
        grace_minutes: i64,
    },
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Verify the hash chain of one tenant, or of all tenants; exits 1 if any is broken.
    Verify {
        /// Tenant slug (default: every tenant and the platform chain).
        #[arg(long)]
        tenant: Option<String>,
    },
}

fn main() -> ExitCode {
    // The first process of a container stays its init, and runs sluice as its child.
    if init::is_pid_1() {
        return init::run();
    }
    init::unblock_signals();
    actix_web::rt::System::new().block_on(start())
}

async fn start() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(mut cli: Cli) -> anyhow::Result<ExitCode> {
    if let Command::Worker { name, tenant } = &cli.command {
        cli.config.worker_name = name.clone().or(cli.config.worker_name.take());
        cli.config.worker_tenant = tenant.clone().or(cli.config.worker_tenant.take());
    }
    let config = Config::load(&cli.config)?;
    telemetry::init(&config.log_format);
    match cli.command {
        Command::Serve => {
            let app = Application::build(config.clone()).await?;
            tracing::info!(bind = %config.bind, database = if config.is_embedded() { "sqlite" } else { "postgres" }, "Sluice is listening");
            println!("Sluice is running on {}", config.public_url);
            if config.signup_enabled {
                println!(
                    "Create a tenant and its admin:\n  curl -s -X POST {0}/api/v1/signup -H 'content-type: application/json' \\\n    -d '{{\"tenant_slug\":\"acme\",\"tenant_name\":\"Acme\",\"email\":\"you@example.com\",\"password\":\"choose-a-long-password\"}}'\nthen log in:\n  curl -s -X POST {0}/api/v1/auth/login -H 'content-type: application/json' \\\n    -d '{{\"email\":\"you@example.com\",\"password\":\"choose-a-long-password\"}}'",
                    config.public_url
                );
            } else {
                println!(
                    "Signup is off; create a tenant with: sluice admin create-tenant --slug acme --admin-email you@example.com"
                );
            }
            app.run_until_stopped().await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Worker { .. } => {
            sluice_backend::engine::run_worker(config).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Migrate => {
            admin::migrate(&config).await?;
            println!("migrations applied");
            Ok(ExitCode::SUCCESS)
        }
        Command::Admin(AdminCommand::CreateTenant { slug, name, admin_email, admin_password }) => {
            let name = name.unwrap_or_else(|| slug.clone());
            let generated = admin::create_tenant(&config, &slug, &name, &admin_email, admin_password).await?;
            println!("created tenant {slug} with admin {admin_email}");
            if let Some(p) = generated {
                println!("generated password: {p}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Admin(AdminCommand::DisableUser { email }) => {
            admin::disable_user(&config, &email).await?;
            println!("disabled {email}; their sessions and tokens no longer work");
            Ok(ExitCode::SUCCESS)
        }
        Command::Admin(AdminCommand::SetTenantLimit { tenant, max_running_tasks, default: _ }) => {
            let before = admin::set_tenant_limit(&config, &tenant, max_running_tasks).await?;
            let show = |v: Option<i64>| v.map_or_else(|| "the default".to_owned(), |n| n.to_string());
            println!(
                "tenant {tenant}: most running tasks {} (was {})",
                show(max_running_tasks.map(i64::from)),
                show(before)
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Admin(AdminCommand::RotateSigningKey { grace_minutes }) => {
            let kid = jwt::rotate(&config.jwt_keys_file, chrono::Duration::minutes(grace_minutes))
                .with_context(|| format!("rotating keys in {}", config.jwt_keys_file.display()))?;
            println!("new signing key {kid}; restart the servers to use it");
            Ok(ExitCode::SUCCESS)
        }
        Command::Audit(AuditCommand::Verify { tenant }) => {
            let ok = admin::audit_verify(&config, tenant.as_deref()).await?;
            Ok(if ok { ExitCode::SUCCESS } else { ExitCode::from(1) })
        }
    }
}
