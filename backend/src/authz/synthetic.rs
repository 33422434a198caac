//! A synthetic tenant with many policies and random requests against it, shared by the
//! differential test (`tests.rs`) and the benchmark (`examples/cedar_bench.rs`, which includes
//! this file with `#[path]` and imports `AuthzRequest`, `Principal`, `Resource` at its root).
//! Deterministic: a seeded SplitMix64, no external randomness.

use std::fmt::Write as _;

use sluice_domain::cedar::Action;
use uuid::Uuid;

use super::{AuthzRequest, Principal, Resource};

/// SplitMix64: small, fast, deterministic.
pub struct Rng(u64);

impl Rng {
    /// A generator from a seed.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    /// True with probability `percent`/100.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.next_u64() % 100 < percent
    }

    /// A random (v4) UUID.
    pub fn uuid(&mut self) -> Uuid {
        let mut bytes = [0u8; 16];
        bytes[..8].copy_from_slice(&self.next_u64().to_le_bytes());
        bytes[8..].copy_from_slice(&self.next_u64().to_le_bytes());
        uuid::Builder::from_random_bytes(bytes).into_uuid()
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

/// A member (user or API token) of the synthetic tenant.
pub struct Member {
    /// Id.
    pub id: Uuid,
    /// Email (users) or token name (tokens).
    pub label: String,
    /// Owner, for tokens.
    pub owner: Option<Uuid>,
    /// Groups.
    pub groups: Vec<String>,
}

/// A pipeline of the synthetic tenant.
pub struct Pipe {
    /// Name.
    pub name: String,
    /// Archived.
    pub archived: bool,
}

/// The synthetic tenant: its policy text and the people and things requests are about.
pub struct Tenant {
    /// Slug.
    pub slug: String,
    /// The policy text (the default policies followed by the generated ones).
    pub text: String,
    /// Number of policies in `text`.
    pub policy_count: usize,
    /// Users.
    pub users: Vec<Member>,
    /// API tokens.
    pub tokens: Vec<Member>,
    /// Pipelines.
    pub pipelines: Vec<Pipe>,
}

const BUILTIN_GROUPS: [&str; 4] = ["admins", "editors", "viewers", "approvers"];
const TEAMS: usize = 60;
const PIPELINE_FAMILIES: usize = 40;

/// A tenant whose policy set is `defaults` followed by generated policies, `total` in all:
/// per-user grants on specific pipelines, per-group grants, `when`/`unless` conditions on
/// resource and principal attributes, and forbids.
pub fn tenant(total: usize, defaults: &str, default_count: usize, seed: u64) -> Tenant {
    let mut rng = Rng::new(seed);
    let slug = "acme".to_owned();
    let users: Vec<Member> = (0..300)
        .map(|k| {
            let mut groups = Vec::new();
            for _ in 0..=rng.below(3) {
                let g = format!("team-{}", rng.below(TEAMS));
                if !groups.contains(&g) {
                    groups.push(g);
                }
            }
            for (g, pct) in BUILTIN_GROUPS.iter().zip([3, 20, 30, 10]) {
                if rng.chance(pct) {
                    groups.push((*g).to_owned());
                }
            }
            Member { id: rng.uuid(), label: format!("user{k}@example.com"), owner: None, groups }
        })
        .collect();
    let tokens: Vec<Member> = (0..30)
        .map(|k| {
            let owner = rng.pick(&users).id;
            let mut groups = vec![format!("team-{}", rng.below(TEAMS))];
            if rng.chance(50) {
                groups.push("editors".to_owned());
            }
            Member {
                id: rng.uuid(),
                label: if k % 3 == 0 { format!("ops-{k}") } else { format!("ci-{k}") },
                owner: Some(owner),
                groups,
            }
        })
        .collect();
    let pipelines: Vec<Pipe> = (0..400)
        .map(|k| Pipe { name: format!("svc-{}-{k}", k % PIPELINE_FAMILIES), archived: rng.chance(10) })
        .collect();

    let mut text = String::with_capacity(total * 200 + defaults.len());
    text.push_str(defaults);
    text.push('\n');
    let pipeline_actions = ["pipeline.read", "pipeline.update", "run.create"];
    for i in 0..total.saturating_sub(default_count) {
        if rng.chance(50) {
            let _ = writeln!(text, "@id(\"custom-{i}\")");
        }
        let user = &rng.pick(&users).id;
        let team = rng.below(TEAMS);
        let pipe = &rng.pick(&pipelines).name;
        let family = rng.below(PIPELINE_FAMILIES);
        let roll = rng.below(100);
        let _ = match roll {
            0..35 => writeln!(
                text,
                "permit (principal == User::\"{user}\", action == Action::\"{}\", resource == Pipeline::\"{pipe}\");",
                rng.pick(&pipeline_actions)
            ),
            35..55 => writeln!(
                text,
                "permit (principal in Group::\"team-{team}\", action in [Action::\"pipeline.read\", Action::\"run.create\", Action::\"run.read\", Action::\"gate.read\"], resource in Pipeline::\"{pipe}\");"
            ),
            55..70 => writeln!(
                text,
                "permit (principal in Group::\"team-{team}\", action == Action::\"pipeline.update\", resource is Pipeline) when {{ resource.name like \"svc-{family}-*\" }} unless {{ resource.archived }};"
            ),
            70..78 => writeln!(
                text,
                "permit (principal is User in Group::\"team-{team}\", action in [Action::\"gate.approve\", Action::\"gate.reject\"], resource in Pipeline::\"{pipe}\") unless {{ resource.run has initiator && resource.run.initiator == principal }};"
            ),
            78..85 => writeln!(
                text,
                "permit (principal is User in Group::\"team-{team}\", action == Action::\"secret.read\", resource == Secret::\"s-{family}\") when {{ principal.email like \"*@example.com\" }};"
            ),
            85..90 => {
                writeln!(text, "forbid (principal == User::\"{user}\", action, resource == Pipeline::\"{pipe}\");")
            }
            90..94 => writeln!(
                text,
                "forbid (principal in Group::\"team-{team}\", action == Action::\"run.create\", resource is Pipeline) when {{ resource.name like \"svc-{family}-*\" }};"
            ),
            94..96 => writeln!(
                text,
                "forbid (principal is ApiToken in Group::\"team-{team}\", action in Action::\"administer\", resource) unless {{ principal.name like \"ops-*\" }};"
            ),
            96..99 => writeln!(
                text,
                "permit (principal, action == Action::\"pipeline.read\", resource == Pipeline::\"{pipe}\") when {{ resource.archived == false }};"
            ),
            _ => writeln!(
                text,
                "permit (principal in Tenant::\"{slug}\", action in [Action::\"tenant.read\", Action::\"pipeline.list\"], resource);"
            ),
        };
    }
    Tenant { slug, text, policy_count: total.max(default_count), users, tokens, pipelines }
}

/// The owned parts of one random request (resolve with [`SynthRequest::as_request`]).
pub struct SynthRequest {
    token: bool,
    member: usize,
    pub(crate) action: Action,
    pipeline: usize,
    run: Uuid,
    initiator: Option<Uuid>,
    name: String,
}

impl Tenant {
    /// A random request: 90 % users, 10 % API tokens; actions weighted towards pipelines,
    /// runs and gates; a run's initiator is often the principal itself.
    pub fn random_request(&self, rng: &mut Rng) -> SynthRequest {
        let token = rng.chance(10);
        let member = if token { rng.below(self.tokens.len()) } else { rng.below(self.users.len()) };
        let action = *rng.pick(Action::ALL);
        let me = if token { self.tokens[member].owner } else { Some(self.users[member].id) };
        let initiator = match rng.below(3) {
            0 => me,
            1 => Some(rng.pick(&self.users).id),
            _ => None,
        };
        SynthRequest {
            token,
            member,
            action,
            pipeline: rng.below(self.pipelines.len()),
            run: rng.uuid(),
            initiator,
            name: format!("s-{}", rng.below(PIPELINE_FAMILIES)),
        }
    }

    /// The request `r` as the authorizer takes it.
    pub fn as_request<'a>(&'a self, r: &'a SynthRequest) -> AuthzRequest<'a> {
        let principal = if r.token {
            let t = &self.tokens[r.member];
            Principal::ApiToken { id: t.id, name: &t.label, owner: t.owner.unwrap_or(t.id), groups: &t.groups }
        } else {
            let u = &self.users[r.member];
            Principal::User { id: u.id, email: &u.label, groups: &u.groups }
        };
        let pipe = &self.pipelines[r.pipeline];
        let resource = match r.action.resource_type() {
            "Pipeline" => Resource::Pipeline { name: &pipe.name, archived: pipe.archived },
            "Run" => Resource::Run { pipeline: &pipe.name, id: r.run, initiator: r.initiator },
            "Gate" => {
                Resource::Gate { pipeline: &pipe.name, run: r.run, id: "prod-approval", run_initiator: r.initiator }
            }
            "Secret" => Resource::Secret { name: &r.name },
            _ => Resource::Tenant,
        };
        AuthzRequest { tenant_slug: &self.slug, principal, action: r.action, resource, context: None }
    }
}
