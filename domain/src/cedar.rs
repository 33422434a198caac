//! The Cedar vocabulary of Sluice: entity type names, action ids, the schema and the default
//! policies of a new tenant.
//!
//! Pure data, no `cedar-policy` dependency (this crate builds for wasm32). The backend's `authz`
//! module parses [`SCHEMA`] and [`DEFAULT_POLICIES`] at start-up and fails closed if either is
//! invalid; its tests keep this file, the schema and the policies in step.

use std::fmt;
use std::str::FromStr;

/// The Cedar schema (Cedar schema syntax). Entity types are namespace-free.
pub const SCHEMA: &str = include_str!("../cedar/sluice.cedarschema");

/// The policy set a new tenant starts with (policy version 1). Every policy has an `@id`.
pub const DEFAULT_POLICIES: &str = include_str!("../cedar/default.cedar");

/// Cedar entity type names (namespace-free), as used in the schema and in entity uids.
pub mod entity {
    /// A tenant; id is the tenant slug (`Tenant::"acme"`).
    pub const TENANT: &str = "Tenant";
    /// A group of members, in a tenant; id is the group name (`Group::"admins"`).
    pub const GROUP: &str = "Group";
    /// A human member; id is the user's UUID. Attributes: `email`.
    pub const USER: &str = "User";
    /// An API token; id is the token's UUID. Attributes: `owner`, `name`.
    pub const API_TOKEN: &str = "ApiToken";
    /// A pipeline; id is its name (`Pipeline::"deploy-api"`). Attributes: `name`, `archived`.
    pub const PIPELINE: &str = "Pipeline";
    /// A version of a pipeline definition.
    pub const PIPELINE_VERSION: &str = "PipelineVersion";
    /// A version of the tenant's policy set.
    pub const POLICY: &str = "Policy";
    /// The tenant's audit log.
    pub const AUDIT_LOG: &str = "AuditLog";
    /// A run of a pipeline; id is the run's UUID. Attributes: optional `initiator`.
    pub const RUN: &str = "Run";
    /// An approval gate of a run; id is `"<run uuid>/<gate id>"`. Attributes: `run`, `name`.
    pub const GATE: &str = "Gate";
    /// A secret; id is its name. Attributes: `name`.
    pub const SECRET: &str = "Secret";
    /// A worker registered with the tenant.
    pub const WORKER: &str = "Worker";
    /// Cedar's action entity type.
    pub const ACTION: &str = "Action";
}

macro_rules! actions {
    ($( $(#[$doc:meta])* $variant:ident = $id:literal on $resource:ident ),+ $(,)?) => {
        /// Every action a principal can be authorized for. [`Action::as_str`] is the Cedar
        /// action id (`Action::"pipeline.read"`).
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum Action {
            $( $(#[$doc])* $variant, )+
        }

        impl Action {
            /// All actions, in declaration order ([`Action::index`] is the position here).
            pub const ALL: &'static [Action] = &[ $( Action::$variant, )+ ];

            /// The Cedar action id, e.g. `"pipeline.read"`.
            pub const fn as_str(self) -> &'static str {
                match self { $( Action::$variant => $id, )+ }
            }

            /// The entity type of the resource this action applies to (see [`entity`]).
            pub const fn resource_type(self) -> &'static str {
                match self { $( Action::$variant => entity::$resource, )+ }
            }
        }
    };
}

actions! {
    /// Read the tenant's settings.
    TenantRead = "tenant.read" on TENANT,
    /// Change the tenant's settings (the HTTP allow-list).
    TenantUpdate = "tenant.update" on TENANT,
    /// List members.
    MemberList = "member.list" on TENANT,
    /// Add a member.
    MemberAdd = "member.add" on TENANT,
    /// Change a member's groups.
    MemberUpdate = "member.update" on TENANT,
    /// Remove a member.
    MemberRemove = "member.remove" on TENANT,
    /// List groups.
    GroupList = "group.list" on TENANT,
    /// Create a group.
    GroupCreate = "group.create" on TENANT,
    /// Rename or change a group.
    GroupUpdate = "group.update" on TENANT,
    /// List API tokens.
    TokenList = "token.list" on TENANT,
    /// Create an API token.
    TokenCreate = "token.create" on TENANT,
    /// Revoke an API token.
    TokenRevoke = "token.revoke" on TENANT,
    /// Read the tenant's policies.
    PolicyRead = "policy.read" on TENANT,
    /// Save a new version of the tenant's policies.
    PolicyUpdate = "policy.update" on TENANT,
    /// List pipelines.
    PipelineList = "pipeline.list" on TENANT,
    /// Create a pipeline.
    PipelineCreate = "pipeline.create" on TENANT,
    /// Read the audit log.
    AuditRead = "audit.read" on TENANT,
    /// Export the audit log.
    AuditExport = "audit.export" on TENANT,
    /// List runs.
    RunList = "run.list" on TENANT,
    /// List secrets (names only).
    SecretList = "secret.list" on TENANT,
    /// List workers.
    WorkerList = "worker.list" on TENANT,
    /// Register a worker of the tenant's own (with an API token of the tenant).
    WorkerRegister = "worker.register" on TENANT,
    /// Read a pipeline and its versions.
    PipelineRead = "pipeline.read" on PIPELINE,
    /// Save a new version of a pipeline.
    PipelineUpdate = "pipeline.update" on PIPELINE,
    /// Archive a pipeline.
    PipelineArchive = "pipeline.archive" on PIPELINE,
    /// Start a run of a pipeline.
    RunCreate = "run.create" on PIPELINE,
    /// Read a run, its tasks and logs.
    RunRead = "run.read" on RUN,
    /// Cancel a run.
    RunCancel = "run.cancel" on RUN,
    /// Retry a failed run.
    RunRetry = "run.retry" on RUN,
    /// Read an approval gate.
    GateRead = "gate.read" on GATE,
    /// Approve a gate.
    GateApprove = "gate.approve" on GATE,
    /// Reject a gate.
    GateReject = "gate.reject" on GATE,
    /// Read a secret's value.
    SecretRead = "secret.read" on SECRET,
    /// Create or overwrite a secret.
    SecretWrite = "secret.write" on SECRET,
    /// Delete a secret.
    SecretDelete = "secret.delete" on SECRET,
}

impl Action {
    /// Position of this action in [`Action::ALL`]; stable for a given build, handy for tables.
    pub const fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The error of parsing an unknown action id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown action `{0}`")]
pub struct UnknownAction(pub String);

impl FromStr for Action {
    type Err = UnknownAction;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Action::ALL.iter().copied().find(|a| a.as_str() == s).ok_or_else(|| UnknownAction(s.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn action_ids_round_trip_and_are_unique() {
        for (i, a) in Action::ALL.iter().enumerate() {
            assert_eq!(a.index(), i);
            assert_eq!(a.as_str().parse::<Action>(), Ok(*a));
            assert!(SCHEMA.contains(&format!("\"{}\"", a.as_str())), "{a} missing from schema");
        }
        let mut ids: Vec<_> = Action::ALL.iter().map(|a| a.as_str()).collect();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), Action::ALL.len());
        assert!("pipeline.launch".parse::<Action>().is_err());
    }
}
