//! The one mapping from Sluice's request types to Cedar uids and entities.
//!
//! Entities are built per request and not validated against the schema at request time (this
//! module is the only producer and builds them to the schema; the fixture and differential
//! tests check that; validating costs about 10 µs more per decision). Building the entity store
//! is the largest part of a decision, so it holds only what policies can dereference: the
//! principal, the resource, the run of a gate, and the action (for `action in <group>`).
//! Ancestors are given in full as direct parents (a user is in its groups and in the tenant;
//! a gate is in its run, pipeline and tenant), so group, pipeline and tenant entities are not
//! needed for `in` tests. Consequence: an expression testing the hierarchy *between two
//! literals* (`Group::"a" in Tenant::"acme"`) is false; no policy needs that.

use std::str::FromStr;

use cedar_policy::{Entities, Entity, EntityId, EntityTypeName, EntityUid, RestrictedExpression};
use sluice_domain::cedar::{Action, entity};
use uuid::Uuid;

use super::{AuthzError, AuthzRequest, Principal, Resource};

/// Pre-parsed entity type names and action uids (parsing them per request would cost more than
/// the whole decision).
pub(crate) struct Vocabulary {
    tenant: EntityTypeName,
    group: EntityTypeName,
    user: EntityTypeName,
    api_token: EntityTypeName,
    pipeline: EntityTypeName,
    run: EntityTypeName,
    gate: EntityTypeName,
    secret: EntityTypeName,
    /// `Action::"<id>"` for each [`Action`], indexed by [`Action::index`].
    actions: Vec<EntityUid>,
    /// The action entity of each [`Action`] with its action groups as parents (Cedar looks the
    /// action up in the entity store for `action in Action::"<group>"`).
    action_entities: Vec<Entity>,
}

fn type_name(name: &str) -> Result<EntityTypeName, AuthzError> {
    EntityTypeName::from_str(name).map_err(|e| AuthzError::Schema(format!("entity type name `{name}`: {e}")))
}

impl Vocabulary {
    pub(crate) fn new() -> Result<Self, AuthzError> {
        let action = type_name(entity::ACTION)?;
        Ok(Self {
            tenant: type_name(entity::TENANT)?,
            group: type_name(entity::GROUP)?,
            user: type_name(entity::USER)?,
            api_token: type_name(entity::API_TOKEN)?,
            pipeline: type_name(entity::PIPELINE)?,
            run: type_name(entity::RUN)?,
            gate: type_name(entity::GATE)?,
            secret: type_name(entity::SECRET)?,
            actions: Action::ALL
                .iter()
                .map(|a| EntityUid::from_type_name_and_id(action.clone(), EntityId::new(a.as_str())))
                .collect(),
            action_entities: Vec::new(),
        })
    }

    /// Record the action hierarchy: `ancestors[a]` are the action groups of action `a`
    /// (by [`Action::index`]), from the schema.
    pub(crate) fn set_action_groups(&mut self, ancestors: &[Vec<EntityUid>]) {
        self.action_entities = self
            .actions
            .iter()
            .zip(ancestors)
            .map(|(uid, groups)| Entity::new_no_attrs(uid.clone(), groups.iter().cloned().collect()))
            .collect();
    }

    /// `Action::"<id>"`.
    pub(crate) fn action(&self, action: Action) -> &EntityUid {
        &self.actions[action.index()]
    }

    fn uid(ty: &EntityTypeName, id: &str) -> EntityUid {
        EntityUid::from_type_name_and_id(ty.clone(), EntityId::new(id))
    }

    fn uuid(ty: &EntityTypeName, id: Uuid) -> EntityUid {
        let mut buf = Uuid::encode_buffer();
        Self::uid(ty, id.hyphenated().encode_lower(&mut buf))
    }
}

/// A request mapped to Cedar: uids, their ancestors (for the scope index) and the entity store.
pub(crate) struct CedarRequest {
    pub principal: EntityUid,
    /// Every ancestor of the principal (its groups, the tenant).
    pub principal_ancestors: Vec<EntityUid>,
    pub resource: EntityUid,
    /// Every ancestor of the resource (pipeline, run, tenant, as applicable).
    pub resource_ancestors: Vec<EntityUid>,
    /// Entities, not yet assembled into an [`Entities`] store (only done when a policy may apply).
    pub entities: Vec<Entity>,
}

impl CedarRequest {
    /// Assemble the entity store (no schema validation). `add_entities` on an empty store
    /// repairs the transitive closure incrementally, measured about twice as fast as
    /// `Entities::from_entities`, which recomputes it with a general cycle-aware algorithm.
    pub(crate) fn into_entities(self) -> Result<Entities, AuthzError> {
        Entities::empty().add_entities(self.entities, None).map_err(|e| AuthzError::Request(format!("entities: {e}")))
    }
}

fn entity(
    uid: EntityUid,
    attrs: Vec<(String, RestrictedExpression)>,
    parents: Vec<EntityUid>,
) -> Result<Entity, AuthzError> {
    Entity::new_with_tags(uid, attrs, parents, []).map_err(|e| AuthzError::Request(format!("entity attributes: {e}")))
}

fn s(v: &str) -> RestrictedExpression {
    RestrictedExpression::new_string(v.to_owned())
}

fn resource_type_name(resource: &Resource<'_>) -> &'static str {
    match resource {
        Resource::Tenant => entity::TENANT,
        Resource::Pipeline { .. } => entity::PIPELINE,
        Resource::Run { .. } => entity::RUN,
        Resource::Gate { .. } => entity::GATE,
        Resource::Secret { .. } => entity::SECRET,
    }
}

impl Vocabulary {
    /// Map a request to Cedar uids and entities. Fails (closed) if the action does not apply to
    /// the resource's type, which would be a bug in the caller.
    pub(crate) fn build(&self, req: &AuthzRequest<'_>) -> Result<CedarRequest, AuthzError> {
        let resource_type = resource_type_name(&req.resource);
        if req.action.resource_type() != resource_type {
            return Err(AuthzError::Request(format!(
                "action `{}` applies to {}, not to {resource_type}",
                req.action,
                req.action.resource_type()
            )));
        }
        let tenant = Vocabulary::uid(&self.tenant, req.tenant_slug);
        let mut entities = Vec::with_capacity(8);

        // Principal: direct parents are its groups and the tenant.
        let (principal, groups, attrs) = match &req.principal {
            Principal::User { id, email, groups } => {
                (Vocabulary::uuid(&self.user, *id), *groups, vec![("email".to_owned(), s(email))])
            }
            Principal::ApiToken { id, name, owner, groups } => (
                Vocabulary::uuid(&self.api_token, *id),
                *groups,
                vec![
                    ("name".to_owned(), s(name)),
                    ("owner".to_owned(), RestrictedExpression::new_entity_uid(Vocabulary::uuid(&self.user, *owner))),
                ],
            ),
        };
        let mut principal_ancestors = Vec::with_capacity(groups.len() + 1);
        for g in groups {
            let uid = Vocabulary::uid(&self.group, g);
            if !principal_ancestors.contains(&uid) {
                principal_ancestors.push(uid);
            }
        }
        principal_ancestors.push(tenant.clone());
        entities.push(entity(principal.clone(), attrs, principal_ancestors.clone())?);

        // Resource and the entities its attributes point to.
        let (resource, resource_ancestors) = match &req.resource {
            Resource::Tenant => (tenant.clone(), Vec::new()),
            Resource::Pipeline { name, archived } => {
                let uid = Vocabulary::uid(&self.pipeline, name);
                let parents = vec![tenant.clone()];
                entities.push(entity(
                    uid.clone(),
                    vec![
                        ("name".to_owned(), s(name)),
                        ("archived".to_owned(), RestrictedExpression::new_bool(*archived)),
                    ],
                    parents.clone(),
                )?);
                (uid, parents)
            }
            Resource::Run { pipeline, id, initiator } => {
                let (uid, parents) = self.run_entity(&mut entities, &tenant, pipeline, *id, *initiator)?;
                (uid, parents)
            }
            Resource::Gate { pipeline, run, id, run_initiator } => {
                let (run_uid, mut parents) = self.run_entity(&mut entities, &tenant, pipeline, *run, *run_initiator)?;
                let mut buf = Uuid::encode_buffer();
                let gate_id = format!("{}/{id}", run.hyphenated().encode_lower(&mut buf));
                let uid = Vocabulary::uid(&self.gate, &gate_id);
                parents.insert(0, run_uid.clone());
                entities.push(entity(
                    uid.clone(),
                    vec![("run".to_owned(), RestrictedExpression::new_entity_uid(run_uid)), ("name".to_owned(), s(id))],
                    parents.clone(),
                )?);
                (uid, parents)
            }
            Resource::Secret { name } => {
                let uid = Vocabulary::uid(&self.secret, name);
                let parents = vec![tenant.clone()];
                entities.push(entity(uid.clone(), vec![("name".to_owned(), s(name))], parents.clone())?);
                (uid, parents)
            }
        };
        if let Some(action) = self.action_entities.get(req.action.index()) {
            entities.push(action.clone());
        }

        Ok(CedarRequest { principal, principal_ancestors, resource, resource_ancestors, entities })
    }

    /// Push the `Run` entity; returns its uid and its ancestors (pipeline, tenant).
    fn run_entity(
        &self,
        entities: &mut Vec<Entity>,
        tenant: &EntityUid,
        pipeline: &str,
        id: Uuid,
        initiator: Option<Uuid>,
    ) -> Result<(EntityUid, Vec<EntityUid>), AuthzError> {
        let uid = Vocabulary::uuid(&self.run, id);
        let parents = vec![Vocabulary::uid(&self.pipeline, pipeline), tenant.clone()];
        let attrs = match initiator {
            Some(user) => {
                vec![("initiator".to_owned(), RestrictedExpression::new_entity_uid(Vocabulary::uuid(&self.user, user)))]
            }
            None => Vec::new(),
        };
        entities.push(entity(uid.clone(), attrs, parents.clone())?);
        Ok((uid, parents))
    }

    /// The type name of a principal or resource uid's entity type, for the scope index.
    pub(crate) fn is_tenant(&self, ty: &EntityTypeName) -> bool {
        ty == &self.tenant
    }
}
