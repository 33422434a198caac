#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

use serde::Deserialize;
use sluice_domain::cedar::{Action, DEFAULT_POLICIES};
use uuid::Uuid;

use super::synthetic::{self, Rng};
use super::*;

const SLUG: &str = "acme";

fn authorizer() -> Authorizer {
    Authorizer::new().expect("schema and default policies are valid")
}

fn default_policy_count() -> usize {
    DEFAULT_POLICIES.matches("@id(").count()
}

// ---------------------------------------------------------------------------------------------
// Schema and default policies

#[test]
fn default_policies_validate_strictly() {
    let authz = authorizer();
    authz.validate(SLUG, authz.default_policy_text()).expect("default policies validate");
    let parsed = validate::parse(DEFAULT_POLICIES).unwrap();
    assert_eq!(parsed.policies.len(), default_policy_count());
    assert!(parsed.policies.iter().all(|p| p.annotation("id").is_some()), "every default policy has an @id");
}

// ---------------------------------------------------------------------------------------------
// ALLOW / DENY fixtures (domain/cedar/fixtures), against the default policies

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
enum FixturePrincipal {
    User { id: Uuid, email: String },
    ApiToken { id: Uuid, name: String, owner: Uuid },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
enum FixtureResource {
    Tenant,
    Pipeline { name: String, archived: bool },
    Run { pipeline: String, id: Uuid, initiator: Option<Uuid> },
    Gate { pipeline: String, run: Uuid, id: String, run_initiator: Option<Uuid> },
    Secret { name: String },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Fixture {
    description: String,
    principal: FixturePrincipal,
    groups: Vec<String>,
    action: String,
    resource: FixtureResource,
    expected: String,
    #[serde(default)]
    determining_policies: Option<Vec<String>>,
}

fn run_fixture(authz: &Authorizer, tenant: Uuid, path: &Path) -> Result<(), String> {
    let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
    let f: Fixture = serde_json::from_str(&text).map_err(|e| format!("bad fixture: {e}"))?;
    let principal = match &f.principal {
        FixturePrincipal::User { id, email } => Principal::User { id: *id, email, groups: &f.groups },
        FixturePrincipal::ApiToken { id, name, owner } => {
            Principal::ApiToken { id: *id, name, owner: *owner, groups: &f.groups }
        }
    };
    let resource = match &f.resource {
        FixtureResource::Tenant => Resource::Tenant,
        FixtureResource::Pipeline { name, archived } => Resource::Pipeline { name, archived: *archived },
        FixtureResource::Run { pipeline, id, initiator } => Resource::Run { pipeline, id: *id, initiator: *initiator },
        FixtureResource::Gate { pipeline, run, id, run_initiator } => {
            Resource::Gate { pipeline, run: *run, id, run_initiator: *run_initiator }
        }
        FixtureResource::Secret { name } => Resource::Secret { name },
    };
    let action: Action = f.action.parse().map_err(|e| format!("{e}"))?;
    let req = AuthzRequest { tenant_slug: SLUG, principal, action, resource, context: None };
    let decision = authz.authorize(tenant, 1, &req).map_err(|e| e.to_string())?;
    let expected_allow = match f.expected.as_str() {
        "ALLOW" => true,
        "DENY" => false,
        other => return Err(format!("expected must be ALLOW or DENY, not {other}")),
    };
    let folder_allow = path.parent().and_then(Path::file_name).is_some_and(|d| d == "ALLOW");
    if folder_allow != expected_allow {
        return Err("fixture is in the wrong folder".to_owned());
    }
    if decision.allowed != expected_allow || !decision.errors.is_empty() {
        return Err(format!("{}: got {decision:?}", f.description));
    }
    if let Some(mut want) = f.determining_policies {
        want.sort_unstable();
        if want != decision.determining_policies {
            return Err(format!(
                "{}: determining policies {:?}, expected {want:?}",
                f.description, decision.determining_policies
            ));
        }
    }
    Ok(())
}

#[test]
fn allow_and_deny_fixtures() {
    let authz = authorizer();
    let tenant = Uuid::new_v4();
    authz.install(tenant, 1, authz.default_policy_text()).unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../domain/cedar/fixtures");
    let mut failures = Vec::new();
    let mut count = [0usize; 2];
    for (i, folder) in ["ALLOW", "DENY"].into_iter().enumerate() {
        let mut paths: Vec<_> = std::fs::read_dir(root.join(folder))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "json"))
            .collect();
        paths.sort();
        for p in paths {
            count[i] += 1;
            if let Err(e) = run_fixture(&authz, tenant, &p) {
                failures.push(format!("{}: {e}", p.display()));
            }
        }
    }
    assert!(count[0] >= 10 && count[1] >= 10, "fixtures found: {count:?}");
    assert!(failures.is_empty(), "failing fixtures:\n{}", failures.join("\n"));
}

// ---------------------------------------------------------------------------------------------
// Validation on save

fn rejected(text: &str) -> PolicyValidationError {
    match authorizer().validate(SLUG, text) {
        Ok(()) => panic!("accepted: {text}"),
        Err(e) => e,
    }
}

#[test]
fn syntax_error_has_line_and_column() {
    let text = "@id(\"ok\")\npermit (principal, action, resource);\n\npermit (principal, action resource);\n";
    let e = rejected(text);
    assert_eq!(e.line, Some(4), "{e:?}");
    assert!(e.column.is_some_and(|c| c > 1), "{e:?}");
    assert!(e.to_string().starts_with("line 4, column "), "{e}");
}

#[test]
fn unknown_entity_type_is_rejected() {
    let text = "permit (principal, action, resource);\npermit (principal == Uzer::\"x\", action, resource);";
    let e = rejected(text);
    assert!(e.message.contains("Uzer"), "{e:?}");
    assert_eq!(e.policy_id.as_deref(), Some("policy1"));
    assert_eq!((e.line, e.column), (Some(2), Some(22)), "{e:?}");
}

#[test]
fn unknown_action_is_rejected() {
    let e = rejected("permit (principal, action == Action::\"pipeline.launch\", resource);");
    assert!(e.message.contains("pipeline.launch"), "{e:?}");
    assert_eq!(e.line, Some(1));
}

#[test]
fn wrong_attribute_type_is_rejected() {
    let e = rejected(
        "permit (principal, action == Action::\"pipeline.read\", resource)\nwhen { resource.archived like \"y*\" };",
    );
    assert_eq!(e.line, Some(2), "{e:?}");
    let e = rejected(
        "permit (principal, action == Action::\"pipeline.read\", resource)\nwhen { resource.owner == principal };",
    );
    assert!(e.message.contains("owner"), "{e:?}");
}

#[test]
fn string_versus_long_comparison_is_rejected() {
    let e = rejected(
        "@id(\"p\")\npermit (principal, action == Action::\"pipeline.read\", resource)\nwhen { resource.name > 3 };",
    );
    assert_eq!(e.policy_id.as_deref(), Some("p"));
    assert_eq!(e.line, Some(3), "{e:?}");
}

#[test]
fn policies_naming_another_tenant_are_rejected() {
    let authz = authorizer();
    authz
        .validate(
            SLUG,
            "permit (principal in Tenant::\"acme\", action == Action::\"tenant.read\", resource == Tenant::\"acme\");",
        )
        .expect("own tenant is fine");
    let e = authz
        .validate(
            SLUG,
            "permit (principal, action, resource);\n@id(\"sneaky\")\npermit (principal in Tenant::\"other\", action, resource);",
        )
        .unwrap_err();
    assert_eq!(e.policy_id.as_deref(), Some("sneaky"));
    assert!(e.message.contains("Tenant::\"other\""), "{e:?}");
    assert_eq!((e.line, e.column), (Some(3), Some(30)), "{e:?}");
    let e = authz
        .validate(
            SLUG,
            "permit (principal, action == Action::\"pipeline.read\", resource)\nwhen { resource in Tenant::\"other\" || principal in [Group::\"x\", Tenant::\"acme\"] };",
        )
        .unwrap_err();
    assert_eq!(e.line, Some(2), "{e:?}");
}

#[test]
fn templates_and_duplicate_ids_are_rejected() {
    let e = rejected("permit (principal == ?principal, action, resource);");
    assert!(e.message.contains("template"), "{e:?}");
    let e = rejected(
        "@id(\"a\")\npermit (principal, action, resource);\n@id(\"a\")\nforbid (principal, action, resource);",
    );
    assert!(e.message.contains("duplicate"), "{e:?}");
    assert_eq!(e.line, Some(3));
}

// ---------------------------------------------------------------------------------------------
// Runtime behaviour

fn user_request<'a>(groups: &'a [String], action: Action, resource: Resource<'a>) -> AuthzRequest<'a> {
    AuthzRequest {
        tenant_slug: SLUG,
        principal: Principal::User { id: Uuid::from_u128(1), email: "ada@example.com", groups },
        action,
        resource,
        context: None,
    }
}

#[test]
fn runtime_error_denies_and_is_reported() {
    let authz = authorizer();
    let text = "@id(\"overflow\")\npermit (principal, action == Action::\"pipeline.read\", resource)\nwhen { 9223372036854775807 + 1 > 0 };";
    authz.validate(SLUG, text).expect("validates; fails only at runtime");
    let tenant = Uuid::new_v4();
    authz.install(tenant, 7, text).unwrap();
    let groups = [];
    let req = user_request(&groups, Action::PipelineRead, Resource::Pipeline { name: "deploy-api", archived: false });
    let d = authz.authorize(tenant, 7, &req).unwrap();
    assert!(!d.allowed);
    assert!(d.determining_policies.is_empty());
    assert_eq!(d.errors.len(), 1);
    assert!(d.errors[0].contains("overflow"), "{d:?}");
}

#[test]
fn cache_is_per_tenant_and_version() {
    let authz = authorizer();
    let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
    let groups = ["viewers".to_owned()];
    let req = user_request(&groups, Action::TenantRead, Resource::Tenant);
    assert!(matches!(authz.authorize(a, 1, &req), Err(AuthzError::NotInstalled { version: 1, .. })));
    authz.install(a, 1, DEFAULT_POLICIES).unwrap();
    assert!(authz.has_version(a, 1) && !authz.has_version(a, 2) && !authz.has_version(b, 1));
    assert!(authz.authorize(a, 1, &req).unwrap().allowed);
    // Version 2 drops the viewers' policy; version 1 is no longer served.
    authz.install(a, 2, "permit (principal in Group::\"admins\", action, resource);").unwrap();
    assert!(authz.has_version(a, 2) && !authz.has_version(a, 1));
    assert!(!authz.authorize(a, 2, &req).unwrap().allowed);
    assert!(authz.authorize(a, 1, &req).is_err());
    assert!(authz.install(b, 1, "permit (principal, action, resource").is_err());
    assert!(!authz.has_version(b, 1));
}

#[test]
fn action_on_the_wrong_resource_type_fails_closed() {
    let authz = authorizer();
    let tenant = Uuid::new_v4();
    authz.install(tenant, 1, DEFAULT_POLICIES).unwrap();
    let groups = ["admins".to_owned()];
    let req = user_request(&groups, Action::PipelineRead, Resource::Tenant);
    assert!(matches!(authz.authorize(tenant, 1, &req), Err(AuthzError::Request(_))));
}

// ---------------------------------------------------------------------------------------------
// The scope index gives the same answer as evaluating every policy

#[test]
fn indexed_evaluation_matches_full_evaluation() {
    let authz = authorizer();
    let mut synth = synthetic::tenant(1000, DEFAULT_POLICIES, default_policy_count(), 42);
    // A few policies that fail at runtime for some requests (errors must match too).
    synth.text.push_str(
        "@id(\"overflow-permit\")\npermit (principal, action == Action::\"pipeline.update\", resource)\nwhen { resource.name like \"svc-1-*\" && 9223372036854775807 + 1 > 0 };\n\
         @id(\"overflow-forbid\")\nforbid (principal is User, action in Action::\"read\", resource is Pipeline)\nwhen { resource.name like \"svc-2-*\" && 9223372036854775807 + 1 > 0 };\n",
    );
    synth.policy_count += 2;
    authz.validate(&synth.slug, &synth.text).expect("synthetic policies validate");
    let tenant = Uuid::new_v4();
    authz.install(tenant, 1, &synth.text).unwrap();
    let compiled = authz.installed(tenant, 1).unwrap();
    assert_eq!(compiled.len(), synth.policy_count);

    let mut rng = Rng::new(7);
    let (mut allowed, mut forbidden, mut errored) = (0, 0, 0);
    // 3000 requests; every third one is about pipelines (read or update), the actions the
    // failing policies concern, so errors occur however many actions there are to draw from.
    let n = 3000;
    for i in 0..n {
        let mut r = synth.random_request(&mut rng);
        if i % 3 == 0 {
            r.action = if i % 2 == 0 { Action::PipelineUpdate } else { Action::PipelineRead };
        }
        let req = synth.as_request(&r);
        let indexed = authz.authorize(tenant, 1, &req).unwrap();
        let full = authz.decide(&compiled, &req, true).unwrap();
        assert_eq!(indexed, full, "request {req:?}");
        allowed += usize::from(indexed.allowed);
        forbidden += usize::from(!indexed.allowed && !indexed.determining_policies.is_empty());
        errored += usize::from(!indexed.errors.is_empty());
    }
    // The comparison is only meaningful if both outcomes (and forbids) occur.
    assert!(allowed > n / 10 && allowed < n * 9 / 10, "allowed {allowed}/{n}");
    assert!(forbidden > 10, "denied by a forbid: {forbidden}/{n}");
    assert!(errored > 5, "with evaluation errors: {errored}/{n}");
}
