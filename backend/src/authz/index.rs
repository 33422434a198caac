//! A tenant's compiled policy set, indexed by scope so that a decision evaluates only the
//! policies that can apply to the request.
//!
//! Cedar evaluates every policy it is given (about 0.5-1 µs each). A policy whose scope does not
//! match the request can neither be satisfied nor error (the scope is checked first and
//! short-circuits the conditions), so:
//!
//! 1. Bitset buckets (by action, principal uid/type, resource uid/type) give the candidates whose
//!    scope may match; each candidate's scope is then checked exactly against the request's
//!    uids and ancestors.
//! 2. A matching policy without `when`/`unless` is satisfied by its scope alone: decided here.
//! 3. Only matching policies with conditions go to Cedar, as a small [`PolicySet`] cached per
//!    candidate set (the same principal doing the same thing to the same resource produces the
//!    same set).
//!
//! Combining (2) and (3) with Cedar's rule (any satisfied forbid denies, else any satisfied
//! permit allows) gives exactly the decision, determining policies and errors of evaluating the
//! full set; the differential test checks this over thousands of random requests.

use std::collections::HashMap;
use std::sync::{Arc, PoisonError, RwLock};

use cedar_policy::{
    ActionConstraint, Effect, EntityTypeName, EntityUid, Policy, PolicySet, PrincipalConstraint, ResourceConstraint,
};
use sluice_domain::cedar::Action;

use super::entities::CedarRequest;

/// At most this many distinct candidate sets are cached per tenant (then the cache restarts).
const MAX_CACHED_SETS: usize = 8192;

/// A principal or resource scope constraint (Cedar's two enums have the same shape).
#[derive(Clone)]
enum Scope {
    Any,
    Eq(EntityUid),
    In(EntityUid),
    Is(EntityTypeName),
    IsIn(EntityTypeName, EntityUid),
}

impl From<PrincipalConstraint> for Scope {
    fn from(c: PrincipalConstraint) -> Self {
        match c {
            PrincipalConstraint::Any => Scope::Any,
            PrincipalConstraint::Eq(u) => Scope::Eq(u),
            PrincipalConstraint::In(u) => Scope::In(u),
            PrincipalConstraint::Is(t) => Scope::Is(t),
            PrincipalConstraint::IsIn(t, u) => Scope::IsIn(t, u),
        }
    }
}

impl From<ResourceConstraint> for Scope {
    fn from(c: ResourceConstraint) -> Self {
        match c {
            ResourceConstraint::Any => Scope::Any,
            ResourceConstraint::Eq(u) => Scope::Eq(u),
            ResourceConstraint::In(u) => Scope::In(u),
            ResourceConstraint::Is(t) => Scope::Is(t),
            ResourceConstraint::IsIn(t, u) => Scope::IsIn(t, u),
        }
    }
}

impl Scope {
    /// Cedar's scope semantics: `in` is reflexive and follows the (complete) ancestor list.
    fn matches(&self, uid: &EntityUid, ancestors: &[EntityUid]) -> bool {
        let within = |u: &EntityUid| u == uid || ancestors.contains(u);
        match self {
            Scope::Any => true,
            Scope::Eq(u) => u == uid,
            Scope::In(u) => within(u),
            Scope::Is(t) => t == uid.type_name(),
            Scope::IsIn(t, u) => t == uid.type_name() && within(u),
        }
    }
}

/// What the index needs to know about one policy.
struct Entry {
    principal: Scope,
    resource: Scope,
    forbid: bool,
    /// Has `when`/`unless` conditions (else its scope decides it).
    conditional: bool,
}

fn set_bit(bits: &mut [u64], i: usize) {
    bits[i / 64] |= 1 << (i % 64);
}

/// Index of one scope dimension (principal or resource).
struct ScopeIndex {
    any: Vec<u64>,
    by_type: HashMap<EntityTypeName, Vec<usize>>,
    by_uid: HashMap<EntityUid, Vec<usize>>,
}

impl ScopeIndex {
    fn new(words: usize) -> Self {
        Self { any: vec![0; words], by_type: HashMap::new(), by_uid: HashMap::new() }
    }

    fn add(&mut self, i: usize, scope: &Scope) {
        match scope {
            Scope::Any => set_bit(&mut self.any, i),
            Scope::Eq(u) | Scope::In(u) | Scope::IsIn(_, u) => {
                self.by_uid.entry(u.clone()).or_default().push(i);
            }
            Scope::Is(t) => self.by_type.entry(t.clone()).or_default().push(i),
        }
    }

    /// The policies whose scope may match `uid` (with these ancestors), into `out`.
    fn candidates(&self, out: &mut [u64], uid: &EntityUid, ancestors: &[EntityUid]) {
        out.copy_from_slice(&self.any);
        let mut or = |list: Option<&Vec<usize>>| {
            for &i in list.into_iter().flatten() {
                set_bit(out, i);
            }
        };
        or(self.by_type.get(uid.type_name()));
        or(self.by_uid.get(uid));
        for a in ancestors {
            or(self.by_uid.get(a));
        }
    }
}

/// One version of a tenant's policies, compiled and indexed.
pub(crate) struct CompiledTenantPolicies {
    /// The policy version this was compiled from.
    pub version: i64,
    /// Every policy, in source order (bit `i` of a candidate set is `policies[i]`).
    policies: Vec<Policy>,
    /// Their ids, as reported in decisions.
    ids: Vec<String>,
    /// Their scopes and kinds.
    entries: Vec<Entry>,
    /// The whole set, for reference evaluation in tests.
    #[cfg_attr(not(test), allow(dead_code))]
    pub full: PolicySet,
    words: usize,
    /// Per [`Action::index`]: the policies whose action scope matches that action (exact).
    actions: Vec<Vec<u64>>,
    principals: ScopeIndex,
    resources: ScopeIndex,
    sets: RwLock<HashMap<Vec<u64>, Arc<PolicySet>>>,
}

impl CompiledTenantPolicies {
    /// Index `policies`. `action_uids[a]` is `Action::"<a>"` and `action_ancestors[a]` its action
    /// groups, both indexed by [`Action::index`].
    pub(crate) fn compile(
        version: i64,
        policies: Vec<Policy>,
        full: PolicySet,
        action_uids: &[EntityUid],
        action_ancestors: &[Vec<EntityUid>],
    ) -> Self {
        let words = policies.len().div_ceil(64).max(1);
        let mut actions = vec![vec![0u64; words]; Action::ALL.len()];
        let mut principals = ScopeIndex::new(words);
        let mut resources = ScopeIndex::new(words);
        let mut entries = Vec::with_capacity(policies.len());
        for (i, p) in policies.iter().enumerate() {
            let entry = Entry {
                principal: p.principal_constraint().into(),
                resource: p.resource_constraint().into(),
                forbid: p.effect() == Effect::Forbid,
                conditional: p.has_non_scope_constraint(),
            };
            principals.add(i, &entry.principal);
            resources.add(i, &entry.resource);
            entries.push(entry);
            let constraint = p.action_constraint();
            for (a, (uid, ancestors)) in action_uids.iter().zip(action_ancestors).enumerate() {
                let matches = match &constraint {
                    ActionConstraint::Any => true,
                    ActionConstraint::Eq(x) => x == uid,
                    ActionConstraint::In(xs) => xs.iter().any(|x| x == uid || ancestors.contains(x)),
                };
                if matches {
                    set_bit(&mut actions[a], i);
                }
            }
        }
        Self {
            version,
            ids: policies.iter().map(|p| p.id().to_string()).collect(),
            entries,
            policies,
            full,
            words,
            actions,
            principals,
            resources,
            sets: RwLock::new(HashMap::new()),
        }
    }

    /// Number of policies.
    #[cfg_attr(not(test), allow(dead_code))]
    pub(crate) fn len(&self) -> usize {
        self.policies.len()
    }

    /// The policies that apply to this request: those decided by their scope alone, and the
    /// set of conditional ones Cedar must evaluate.
    pub(crate) fn select(&self, action: Action, req: &CedarRequest) -> Result<Selection, String> {
        let mut selection = Selection::default();
        let mut mask = self.actions[action.index()].clone();
        if mask.iter().all(|w| *w == 0) {
            return Ok(selection);
        }
        let mut scratch = vec![0u64; self.words];
        self.principals.candidates(&mut scratch, &req.principal, &req.principal_ancestors);
        mask.iter_mut().zip(&scratch).for_each(|(m, s)| *m &= s);
        self.resources.candidates(&mut scratch, &req.resource, &req.resource_ancestors);
        mask.iter_mut().zip(&scratch).for_each(|(m, s)| *m &= s);

        // Exact scope check; scope-only policies are decided here, the rest go to Cedar.
        let mut to_cedar = false;
        for (w, word) in mask.iter_mut().enumerate() {
            let mut bits = *word;
            while bits != 0 {
                let bit = bits.trailing_zeros();
                bits &= bits - 1;
                let i = w * 64 + bit as usize;
                let Some(entry) = self.entries.get(i) else {
                    return Err(format!("policy index {i} out of range"));
                };
                let applies = entry.principal.matches(&req.principal, &req.principal_ancestors)
                    && entry.resource.matches(&req.resource, &req.resource_ancestors);
                if applies && entry.conditional {
                    to_cedar = true;
                    continue;
                }
                *word &= !(1u64 << bit);
                if applies {
                    if entry.forbid {
                        selection.forbids.push(self.ids[i].clone());
                    } else {
                        selection.permits.push(self.ids[i].clone());
                    }
                }
            }
        }
        if !to_cedar {
            return Ok(selection);
        }
        if let Some(set) = self.sets.read().unwrap_or_else(PoisonError::into_inner).get(&mask) {
            selection.cedar = Some(Arc::clone(set));
            return Ok(selection);
        }
        let set = Arc::new(self.build(&mask)?);
        let mut sets = self.sets.write().unwrap_or_else(PoisonError::into_inner);
        if sets.len() >= MAX_CACHED_SETS {
            sets.clear();
        }
        sets.insert(mask, Arc::clone(&set));
        selection.cedar = Some(set);
        Ok(selection)
    }

    fn build(&self, mask: &[u64]) -> Result<PolicySet, String> {
        let mut set = PolicySet::new();
        for (w, word) in mask.iter().enumerate() {
            let mut bits = *word;
            while bits != 0 {
                let i = w * 64 + bits.trailing_zeros() as usize;
                bits &= bits - 1;
                let p = self.policies.get(i).ok_or_else(|| format!("policy index {i} out of range"))?;
                set.add(p.clone()).map_err(|e| e.to_string())?;
            }
        }
        Ok(set)
    }
}

/// The outcome of [`CompiledTenantPolicies::select`].
#[derive(Default)]
pub(crate) struct Selection {
    /// Ids of unconditional permits whose scope matches (satisfied).
    pub permits: Vec<String>,
    /// Ids of unconditional forbids whose scope matches (satisfied).
    pub forbids: Vec<String>,
    /// The conditional policies whose scope matches, for Cedar to evaluate.
    pub cedar: Option<Arc<PolicySet>>,
}
