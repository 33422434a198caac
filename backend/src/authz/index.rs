//! A tenant's compiled policy set, indexed by scope so that a decision evaluates only the
//! policies that can apply to the request.
//!
//! Cedar evaluates every policy it is given (about 0.5 µs each). A policy whose scope does not
//! match the request can neither be satisfied nor error (the scope is checked first and
//! short-circuits the conditions), so evaluating only the policies whose scope *may* match gives
//! exactly the decision, determining policies and errors of evaluating the full set. The index is
//! conservative (a candidate set may contain policies that turn out not to match; Cedar decides),
//! never the other way round — the differential test checks this.
//!
//! Candidate sets are bitsets; the small [`PolicySet`] built for a candidate set is cached, since
//! the same principal doing the same thing to the same resource produces the same set.

use std::collections::HashMap;
use std::sync::{Arc, PoisonError, RwLock};

use cedar_policy::{
    ActionConstraint, EntityTypeName, EntityUid, Policy, PolicySet, PrincipalConstraint,
    ResourceConstraint,
};
use sluice_domain::cedar::Action;

use super::entities::CedarRequest;

/// At most this many distinct candidate sets are cached per tenant (then the cache restarts).
const MAX_CACHED_SETS: usize = 8192;

/// What a principal or resource scope constraint can match, for indexing.
enum Scope {
    Any,
    /// `== uid`, `in uid`, `is T in uid`: the request's entity or one of its ancestors is `uid`.
    Uid(EntityUid),
    /// `is T`.
    Type(EntityTypeName),
}

impl From<PrincipalConstraint> for Scope {
    fn from(c: PrincipalConstraint) -> Self {
        match c {
            PrincipalConstraint::Any => Scope::Any,
            PrincipalConstraint::In(u) | PrincipalConstraint::Eq(u) => Scope::Uid(u),
            PrincipalConstraint::IsIn(_, u) => Scope::Uid(u),
            PrincipalConstraint::Is(t) => Scope::Type(t),
        }
    }
}

impl From<ResourceConstraint> for Scope {
    fn from(c: ResourceConstraint) -> Self {
        match c {
            ResourceConstraint::Any => Scope::Any,
            ResourceConstraint::In(u) | ResourceConstraint::Eq(u) => Scope::Uid(u),
            ResourceConstraint::IsIn(_, u) => Scope::Uid(u),
            ResourceConstraint::Is(t) => Scope::Type(t),
        }
    }
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
        Self {
            any: vec![0; words],
            by_type: HashMap::new(),
            by_uid: HashMap::new(),
        }
    }

    fn add(&mut self, i: usize, scope: Scope) {
        match scope {
            Scope::Any => set_bit(&mut self.any, i),
            Scope::Uid(u) => self.by_uid.entry(u).or_default().push(i),
            Scope::Type(t) => self.by_type.entry(t).or_default().push(i),
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
        for (i, p) in policies.iter().enumerate() {
            principals.add(i, p.principal_constraint().into());
            resources.add(i, p.resource_constraint().into());
            let constraint = p.action_constraint();
            for (a, (uid, ancestors)) in action_uids.iter().zip(action_ancestors).enumerate() {
                let matches = match &constraint {
                    ActionConstraint::Any => true,
                    ActionConstraint::Eq(x) => x == uid,
                    ActionConstraint::In(xs) => {
                        xs.iter().any(|x| x == uid || ancestors.contains(x))
                    }
                };
                if matches {
                    set_bit(&mut actions[a], i);
                }
            }
        }
        Self {
            version,
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

    /// The policy set of the policies that may apply to this request, or `None` if none can.
    pub(crate) fn select(
        &self,
        action: Action,
        req: &CedarRequest,
    ) -> Result<Option<Arc<PolicySet>>, String> {
        let mut mask = self.actions[action.index()].clone();
        if mask.iter().all(|w| *w == 0) {
            return Ok(None);
        }
        let mut scratch = vec![0u64; self.words];
        self.principals
            .candidates(&mut scratch, &req.principal, &req.principal_ancestors);
        mask.iter_mut().zip(&scratch).for_each(|(m, s)| *m &= s);
        self.resources
            .candidates(&mut scratch, &req.resource, &req.resource_ancestors);
        mask.iter_mut().zip(&scratch).for_each(|(m, s)| *m &= s);
        if mask.iter().all(|w| *w == 0) {
            return Ok(None);
        }
        if let Some(set) = self
            .sets
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&mask)
        {
            return Ok(Some(Arc::clone(set)));
        }
        let set = Arc::new(self.build(&mask)?);
        let mut sets = self.sets.write().unwrap_or_else(PoisonError::into_inner);
        if sets.len() >= MAX_CACHED_SETS {
            sets.clear();
        }
        sets.insert(mask, Arc::clone(&set));
        Ok(Some(set))
    }

    fn build(&self, mask: &[u64]) -> Result<PolicySet, String> {
        let mut set = PolicySet::new();
        for (w, word) in mask.iter().enumerate() {
            let mut bits = *word;
            while bits != 0 {
                let i = w * 64 + bits.trailing_zeros() as usize;
                bits &= bits - 1;
                let p = self
                    .policies
                    .get(i)
                    .ok_or_else(|| format!("policy index {i} out of range"))?;
                set.add(p.clone()).map_err(|e| e.to_string())?;
            }
        }
        Ok(set)
    }
}
