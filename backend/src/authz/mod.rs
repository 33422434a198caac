//! Authorization: every action is decided by Cedar, here, in one place.
//!
//! - The schema ([`sluice_domain::cedar::SCHEMA`]) and the default policies are parsed and
//!   validated by [`Authorizer::new`]; the server fails closed if either is invalid.
//! - A tenant's policy text is validated strictly against the schema on save
//!   ([`Authorizer::validate`]), including the rule that it names no other tenant.
//! - [`Authorizer::install`] compiles one version of a tenant's policies into a scope index,
//!   cached per tenant; [`Authorizer::authorize`] maps the request to Cedar entities and
//!   evaluates only the policies whose scope can match (see `index.rs`), with exactly the
//!   decision of evaluating the whole set.
//!
//! Architecture Invariant: handlers never check roles by hand; they call [`Authorizer::authorize`]
//! and record [`Decision::determining_policies`] in the audit event.

mod entities;
mod index;
mod validate;

#[cfg(test)]
mod synthetic;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, PoisonError, RwLock};

use cedar_policy::{Context, Decision as CedarDecision, Request, Schema, Validator};
use sluice_domain::cedar::{Action, DEFAULT_POLICIES, SCHEMA};
use uuid::Uuid;

use entities::Vocabulary;
use index::{CompiledTenantPolicies, Selection};

/// Errors of the authorization layer (other than policy validation, see
/// [`PolicyValidationError`]). Every one of them means "not authorized" to a caller.
#[derive(Debug, thiserror::Error)]
pub enum AuthzError {
    /// The built-in Cedar schema does not parse or does not match the action vocabulary.
    #[error("invalid Cedar schema: {0}")]
    Schema(String),
    /// The built-in default policies do not parse or validate.
    #[error("invalid default policies: {0}")]
    DefaultPolicies(PolicyValidationError),
    /// A stored policy text does not compile (it should have been validated on save).
    #[error("policy version {version} of tenant {tenant_id} does not compile: {source}")]
    Compile {
        /// The tenant.
        tenant_id: Uuid,
        /// The policy version.
        version: i64,
        /// Why.
        source: PolicyValidationError,
    },
    /// The requested policy version is not installed; load it, [`Authorizer::install`] it and
    /// retry.
    #[error("policy version {version} of tenant {tenant_id} is not installed")]
    NotInstalled {
        /// The tenant.
        tenant_id: Uuid,
        /// The policy version asked for.
        version: i64,
    },
    /// The request cannot be mapped to Cedar (e.g. an action applied to the wrong resource
    /// type, or an invalid context): a bug in the caller; denied.
    #[error("invalid authorization request: {0}")]
    Request(String),
}

/// Why a tenant's policy text was rejected: Cedar's message, the policy concerned and the
/// 1-based position in the text, when known.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct PolicyValidationError {
    /// Human-readable reason (Cedar's message, with help when it has one).
    pub message: String,
    /// The id (`@id` or `policy<N>`) of the offending policy, when known.
    pub policy_id: Option<String>,
    /// 1-based line of the offending source position, when known.
    pub line: Option<u32>,
    /// 1-based column (in characters) of the offending source position, when known.
    pub column: Option<u32>,
}

impl fmt::Display for PolicyValidationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let (Some(line), Some(column)) = (self.line, self.column) {
            write!(f, "line {line}, column {column}: ")?;
        }
        f.write_str(&self.message)
    }
}

/// Who is asking. Ids are the principal's UUID; `groups` are the tenant-local group names the
/// principal belongs to (from the membership checked for this request).
#[derive(Debug, Clone, Copy)]
pub enum Principal<'a> {
    /// A human member of the tenant.
    User {
        /// The user's id.
        id: Uuid,
        /// The user's email.
        email: &'a str,
        /// The user's groups in this tenant.
        groups: &'a [String],
    },
    /// An API token of the tenant.
    ApiToken {
        /// The token's id.
        id: Uuid,
        /// The token's name.
        name: &'a str,
        /// The user who created the token.
        owner: Uuid,
        /// The token's groups in this tenant.
        groups: &'a [String],
    },
}

/// What is acted on. Must match the action's resource type
/// ([`Action::resource_type`]); otherwise [`Authorizer::authorize`] fails closed.
#[derive(Debug, Clone, Copy)]
pub enum Resource<'a> {
    /// The tenant itself (`Tenant::"<slug>"`).
    Tenant,
    /// A pipeline (`Pipeline::"<name>"`).
    Pipeline {
        /// Pipeline name.
        name: &'a str,
        /// Whether it is archived.
        archived: bool,
    },
    /// A run of a pipeline (`Run::"<uuid>"`).
    Run {
        /// The pipeline's name.
        pipeline: &'a str,
        /// The run's id.
        id: Uuid,
        /// The user who started it, if a user did.
        initiator: Option<Uuid>,
    },
    /// An approval gate of a run (`Gate::"<run uuid>/<gate id>"`).
    Gate {
        /// The pipeline's name.
        pipeline: &'a str,
        /// The run's id.
        run: Uuid,
        /// The gate's id within the run.
        id: &'a str,
        /// The user who started the run, if a user did.
        run_initiator: Option<Uuid>,
    },
    /// A secret (`Secret::"<name>"`).
    Secret {
        /// Secret name.
        name: &'a str,
    },
}

/// One authorization request inside one tenant.
#[derive(Debug, Clone)]
pub struct AuthzRequest<'a> {
    /// The tenant's slug (`Tenant::"<slug>"`).
    pub tenant_slug: &'a str,
    /// Who.
    pub principal: Principal<'a>,
    /// Does what.
    pub action: Action,
    /// To what.
    pub resource: Resource<'a>,
    /// Optional Cedar context record (JSON object). The schema declares no context attributes
    /// yet, so validated policies cannot use it.
    pub context: Option<serde_json::Value>,
}

/// The outcome of [`Authorizer::authorize`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// Allowed (some permit satisfied, no forbid satisfied).
    pub allowed: bool,
    /// Ids of the determining policies (satisfied permits if allowed, satisfied forbids if
    /// denied by a forbid, empty if denied for lack of a permit), sorted. For the audit event.
    pub determining_policies: Vec<String>,
    /// Policies that failed to evaluate (treated as not satisfied): Cedar's messages, each
    /// naming the policy (``error while evaluating policy `<id>`: …``).
    pub errors: Vec<String>,
}

/// Decides requests with Cedar. Shared by all request handlers (`Send + Sync`).
pub struct Authorizer {
    validator: Validator,
    vocab: Vocabulary,
    /// Action groups of each action, by [`Action::index`].
    action_ancestors: Vec<Vec<cedar_policy::EntityUid>>,
    cedar: cedar_policy::Authorizer,
    tenants: RwLock<HashMap<Uuid, Arc<CompiledTenantPolicies>>>,
}

impl fmt::Debug for Authorizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Authorizer").finish_non_exhaustive()
    }
}

impl Authorizer {
    /// Parses and validates the schema and the default policies; fails closed (Err) if either is
    /// invalid or if the schema does not declare every [`Action`] for its resource type.
    pub fn new() -> Result<Self, AuthzError> {
        let (schema, warnings) = Schema::from_cedarschema_str(SCHEMA).map_err(|e| AuthzError::Schema(e.to_string()))?;
        for w in warnings {
            tracing::debug!(warning = %w, "cedar schema warning");
        }
        let mut vocab = Vocabulary::new()?;
        let action_entities = schema.action_entities().map_err(|e| AuthzError::Schema(e.to_string()))?;
        let mut action_ancestors = Vec::with_capacity(Action::ALL.len());
        for &action in Action::ALL {
            let uid = vocab.action(action);
            let ancestors = action_entities
                .ancestors(uid)
                .ok_or_else(|| AuthzError::Schema(format!("action {uid} is not declared")))?
                .cloned()
                .collect();
            action_ancestors.push(ancestors);
            let resources: Vec<String> =
                schema.resources_for_action(uid).into_iter().flatten().map(ToString::to_string).collect();
            if resources != [action.resource_type()] {
                return Err(AuthzError::Schema(format!(
                    "action {uid} applies to {resources:?}, expected [{}]",
                    action.resource_type()
                )));
            }
        }
        vocab.set_action_groups(&action_ancestors);
        let validator = Validator::new(schema);
        let defaults = validate::parse(DEFAULT_POLICIES).map_err(AuthzError::DefaultPolicies)?;
        defaults.validate(DEFAULT_POLICIES, &validator).map_err(AuthzError::DefaultPolicies)?;
        Ok(Self {
            validator,
            vocab,
            action_ancestors,
            cedar: cedar_policy::Authorizer::new(),
            tenants: RwLock::new(HashMap::new()),
        })
    }

    /// The default policy text a new tenant starts with (version 1).
    pub fn default_policy_text(&self) -> &'static str {
        DEFAULT_POLICIES
    }

    /// Strict validation of a tenant's policy text against the schema; also rejects any policy
    /// that names a `Tenant` other than `tenant_slug` (in its scope or conditions), templates,
    /// and duplicate `@id`s. The error carries Cedar's message and a 1-based line/column of the
    /// offending source position when known.
    pub fn validate(&self, tenant_slug: &str, text: &str) -> Result<(), PolicyValidationError> {
        let parsed = validate::parse(text)?;
        parsed.validate(text, &self.validator)?;
        parsed.check_tenant(text, tenant_slug, &self.vocab)
    }

    /// Compile and cache a tenant's policy set for (`tenant_id`, `version`). Cheap no-op if that
    /// version is cached. The text is parsed and validated against the schema again (fail
    /// closed); the tenant-boundary check is [`Authorizer::validate`]'s, on save.
    pub fn install(&self, tenant_id: Uuid, version: i64, text: &str) -> Result<(), AuthzError> {
        if self.has_version(tenant_id, version) {
            return Ok(());
        }
        let compile_err = |source| AuthzError::Compile { tenant_id, version, source };
        let parsed = validate::parse(text).map_err(compile_err)?;
        parsed.validate(text, &self.validator).map_err(compile_err)?;
        let full = parsed.policy_set().map_err(|message| {
            compile_err(PolicyValidationError { message, policy_id: None, line: None, column: None })
        })?;
        let action_uids: Vec<_> = Action::ALL.iter().map(|a| self.vocab.action(*a).clone()).collect();
        let compiled =
            CompiledTenantPolicies::compile(version, parsed.policies, full, &action_uids, &self.action_ancestors);
        self.tenants.write().unwrap_or_else(PoisonError::into_inner).insert(tenant_id, Arc::new(compiled));
        tracing::debug!(%tenant_id, version, "installed tenant policies");
        Ok(())
    }

    /// Whether the cache holds exactly this version for the tenant.
    pub fn has_version(&self, tenant_id: Uuid, version: i64) -> bool {
        self.compiled(tenant_id).is_some_and(|c| c.version == version)
    }

    fn compiled(&self, tenant_id: Uuid) -> Option<Arc<CompiledTenantPolicies>> {
        self.tenants.read().unwrap_or_else(PoisonError::into_inner).get(&tenant_id).cloned()
    }

    fn installed(&self, tenant_id: Uuid, version: i64) -> Result<Arc<CompiledTenantPolicies>, AuthzError> {
        self.compiled(tenant_id).filter(|c| c.version == version).ok_or(AuthzError::NotInstalled { tenant_id, version })
    }

    /// The one authorization path. Uses the cached set for (`tenant_id`, `version`); if that
    /// version is not cached returns [`AuthzError::NotInstalled`] so the caller loads, installs
    /// and retries. Policies that fail to evaluate count as not satisfied; they are logged and
    /// listed in [`Decision::errors`].
    pub fn authorize(&self, tenant_id: Uuid, version: i64, req: &AuthzRequest<'_>) -> Result<Decision, AuthzError> {
        let compiled = self.installed(tenant_id, version)?;
        self.decide(&compiled, req, false)
    }

    /// Evaluate with the scope index, or (`full`, for tests) the whole set with Cedar alone.
    fn decide(
        &self,
        compiled: &CompiledTenantPolicies,
        req: &AuthzRequest<'_>,
        full: bool,
    ) -> Result<Decision, AuthzError> {
        let mapped = self.vocab.build(req)?;
        let selection = if full {
            Selection { cedar: Some(Arc::new(compiled.full.clone())), ..Selection::default() }
        } else {
            compiled.select(req.action, &mapped).map_err(AuthzError::Request)?
        };
        let Selection { mut permits, mut forbids, cedar } = selection;
        let mut errors = Vec::new();
        if let Some(policies) = cedar {
            let context = match &req.context {
                None => Context::empty(),
                Some(v) => Context::from_json_value(v.clone(), None)
                    .map_err(|e| AuthzError::Request(format!("context: {e}")))?,
            };
            let request = Request::new(
                mapped.principal.clone(),
                self.vocab.action(req.action).clone(),
                mapped.resource.clone(),
                context,
                None,
            )
            .map_err(|e| AuthzError::Request(e.to_string()))?;
            let entities = mapped.into_entities()?;
            let response = self.cedar.is_authorized(&request, &policies, &entities);
            let diagnostics = response.diagnostics();
            // Cedar reports the satisfied permits when it allows, the satisfied forbids when
            // it denies because of one, and nothing when no policy is satisfied.
            let reasons = diagnostics.reason().map(ToString::to_string);
            match response.decision() {
                CedarDecision::Allow => permits.extend(reasons),
                CedarDecision::Deny => forbids.extend(reasons),
            }
            for e in diagnostics.errors() {
                let cedar_policy::AuthorizationError::PolicyEvaluationError(pe) = e;
                let policy_id = pe.policy_id();
                tracing::warn!(%policy_id, error = %e, action = %req.action, "cedar policy evaluation error; policy skipped");
                errors.push(e.to_string());
            }
        }
        // Cedar's rule: any satisfied forbid denies; otherwise any satisfied permit allows.
        let (allowed, mut determining_policies) =
            if forbids.is_empty() { (!permits.is_empty(), permits) } else { (false, forbids) };
        determining_policies.sort_unstable();
        errors.sort_unstable();
        Ok(Decision { allowed, determining_policies, errors })
    }
}
