//! Cedar decision latency through the server's one authorization path,
//! [`Authorizer::authorize`].
//!
//! `cargo run --release -p sluice-backend --example cedar_bench`
//!
//! Scenarios: (a) the default policies, (b) a tenant with 1,000 policies (per-user grants on
//! specific pipelines, per-group grants, `when`/`unless` conditions, forbids). Each runs
//! 20,000 random requests (after a warm-up) and prints one line
//! `cedar <scenario> p50=<µs>us p99=<µs>us mean=<µs>us max=<µs>us n=<n> allowed=<%>`
//! and one line `cedar <scenario>_allowed_only ...` for the allowed decisions alone (these
//! always evaluate policies; many denials end early when no policy's scope matches).
//! Tenant (b) also prints its `validate` and `install` times.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

// `Principal` and `Resource` are used by the shared `synthetic` module (through `super::`).
use sluice_backend::authz::{Authorizer, AuthzRequest, Principal, Resource};
use sluice_domain::cedar::DEFAULT_POLICIES;
use uuid::Uuid;

#[path = "../src/authz/synthetic.rs"]
#[allow(dead_code)]
mod synthetic;

const WARMUP: usize = 2_000;
const REQUESTS: usize = 20_000;

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn run(name: &str, authz: &Authorizer, tenant: Uuid, version: i64, synth: &synthetic::Tenant) {
    let mut rng = synthetic::Rng::new(0x5eed);
    let owned: Vec<_> = (0..WARMUP + REQUESTS).map(|_| synth.random_request(&mut rng)).collect();
    let requests: Vec<AuthzRequest<'_>> = owned.iter().map(|r| synth.as_request(r)).collect();
    let mut samples = Vec::with_capacity(REQUESTS);
    let mut allowed_samples = Vec::new();
    for (i, req) in requests.iter().enumerate() {
        let start = Instant::now();
        let decision = authz.authorize(tenant, version, req).expect("authorize");
        let elapsed = start.elapsed();
        if i >= WARMUP {
            samples.push(elapsed);
            if decision.allowed {
                allowed_samples.push(elapsed);
            }
        }
    }
    let allowed = 100.0 * allowed_samples.len() as f64 / samples.len() as f64;
    print_line(name, &mut samples, &format!(" allowed={allowed:.0}%"));
    // Allowed decisions always reach a satisfied policy (no early "nothing applies" exit).
    print_line(&format!("{name}_allowed_only"), &mut allowed_samples, "");
}

fn print_line(name: &str, samples: &mut [Duration], extra: &str) {
    if samples.is_empty() {
        println!("cedar {name} n=0");
        return;
    }
    samples.sort_unstable();
    let pct = |p: f64| {
        let i = ((samples.len() as f64 * p) as usize).min(samples.len() - 1);
        micros(samples[i])
    };
    let mean = micros(samples.iter().sum::<Duration>()) / samples.len() as f64;
    println!(
        "cedar {name} p50={:.1}us p99={:.1}us mean={mean:.1}us max={:.1}us n={}{extra}",
        pct(0.50),
        pct(0.99),
        micros(samples[samples.len() - 1]),
        samples.len(),
    );
}

fn main() {
    let authz = Authorizer::new().expect("schema and default policies");
    let default_count = DEFAULT_POLICIES.matches("@id(").count();

    // (a) The default policies; principals are spread over the built-in groups.
    let defaults = synthetic::tenant(0, DEFAULT_POLICIES, default_count, 1);
    let tenant_a = Uuid::new_v4();
    authz.install(tenant_a, 1, &defaults.text).expect("install defaults");
    run("default_policies", &authz, tenant_a, 1, &defaults);

    // (b) 1,000 policies.
    let big = synthetic::tenant(1000, DEFAULT_POLICIES, default_count, 42);
    let tenant_b = Uuid::new_v4();
    let start = Instant::now();
    authz.validate(&big.slug, &big.text).expect("validate 1,000 policies");
    let validated = start.elapsed();
    let start = Instant::now();
    authz.install(tenant_b, 1, &big.text).expect("install 1,000 policies");
    let installed = start.elapsed();
    println!(
        "cedar tenant_{}_policies validate={:.1}ms install={:.1}ms",
        big.policy_count,
        validated.as_secs_f64() * 1e3,
        installed.as_secs_f64() * 1e3
    );
    run(&format!("tenant_{}_policies", big.policy_count), &authz, tenant_b, 1, &big);
}
