//! Parsing a tenant's policy text into policies with their final ids, strict validation against
//! the schema, and the tenant-boundary check. Errors carry 1-based line/column positions.

use std::collections::HashSet;
use std::str::FromStr;

use cedar_policy::ffi::DetailedError;
use cedar_policy::{Policy, PolicyId, PolicySet, ValidationMode, Validator};

use super::PolicyValidationError;
use super::entities::Vocabulary;

/// Policies of one text, in source order, with their final ids (`@id` or `policy<N>`).
pub(crate) struct ParsedPolicies {
    pub policies: Vec<Policy>,
    /// Byte offset of each policy in the source text, when found.
    offsets: Vec<Option<usize>>,
}

/// 1-based line and column (in characters) of a byte offset in `text`.
fn line_col(text: &str, offset: usize) -> (u32, u32) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line = before.bytes().filter(|b| *b == b'\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before[line_start..].chars().count() + 1;
    (u32::try_from(line).unwrap_or(u32::MAX), u32::try_from(column).unwrap_or(u32::MAX))
}

fn error_at(text: &str, message: String, policy_id: Option<String>, offset: Option<usize>) -> PolicyValidationError {
    let (line, column) = match offset.map(|o| line_col(text, o)) {
        Some((l, c)) => (Some(l), Some(c)),
        None => (None, None),
    };
    PolicyValidationError { message, policy_id, line, column }
}

/// Cedar's message (with its causes and help) and the start of its first source label.
fn detailed(err: DetailedError) -> (String, Option<usize>) {
    let offset = err.source_locations.first().map(|l| l.loc.start);
    let message = match err.help {
        Some(help) => format!("{} (help: {help})", err.message),
        None => err.message,
    };
    (message, offset)
}

/// Generated ids are `policy<N>` in source order.
fn generated_index(id: &PolicyId) -> usize {
    id.to_string().strip_prefix("policy").and_then(|n| n.parse().ok()).unwrap_or(usize::MAX)
}

/// Parse `text` into policies with final ids. Rejects templates, empty and duplicate ids.
pub(crate) fn parse(text: &str) -> Result<ParsedPolicies, PolicyValidationError> {
    let pset = PolicySet::from_str(text).map_err(|errs| {
        let first = errs.iter().next().map(DetailedError::from);
        let (message, offset) = match first {
            Some(d) => detailed(d),
            None => (errs.to_string(), None),
        };
        error_at(text, message, None, offset)
    })?;
    if let Some(t) = pset.templates().next() {
        return Err(error_at(
            text,
            format!("policy templates (`?principal`, `?resource`) are not supported (template `{}`)", t.id()),
            Some(t.id().to_string()),
            None,
        ));
    }
    let mut generated: Vec<&Policy> = pset.policies().collect();
    generated.sort_by_key(|p| generated_index(p.id()));

    let mut policies = Vec::with_capacity(generated.len());
    let mut offsets = Vec::with_capacity(generated.len());
    let mut seen = HashSet::with_capacity(generated.len());
    let mut cursor = 0;
    for p in generated {
        // The lossless text of a parsed policy is its exact source slice; policies are in
        // source order, so a forward search finds each one's position.
        let offset = p.to_cedar().and_then(|src| {
            let found = text.get(cursor..)?.find(&src)? + cursor;
            cursor = found + src.len();
            Some(found)
        });
        let id = match p.annotation("id") {
            Some("") => {
                return Err(error_at(text, "empty @id annotation".to_owned(), None, offset));
            }
            Some(id) => id.to_owned(),
            None => p.id().to_string(),
        };
        if !seen.insert(id.clone()) {
            return Err(error_at(text, format!("duplicate policy id `{id}`"), Some(id), offset));
        }
        policies.push(p.new_id(PolicyId::new(&id)));
        offsets.push(offset);
    }
    Ok(ParsedPolicies { policies, offsets })
}

impl ParsedPolicies {
    /// A policy set of all the policies (ids already unique).
    pub(crate) fn policy_set(&self) -> Result<PolicySet, String> {
        PolicySet::from_policies(self.policies.iter().cloned()).map_err(|e| e.to_string())
    }

    fn offset_of(&self, id: &PolicyId) -> Option<usize> {
        self.policies.iter().position(|p| p.id() == id).and_then(|i| self.offsets[i])
    }

    /// Strict validation against the schema. Reports the first error (and how many more).
    pub(crate) fn validate(&self, text: &str, validator: &Validator) -> Result<(), PolicyValidationError> {
        let pset = self.policy_set().map_err(|m| error_at(text, m, None, None))?;
        let result = validator.validate(&pset, ValidationMode::Strict);
        let mut errors = result.validation_errors();
        let Some(first) = errors.next() else {
            return Ok(());
        };
        let more = errors.count();
        let (mut message, offset) = detailed(DetailedError::from(first));
        if more > 0 {
            message.push_str(&format!(" (and {more} more error(s))"));
        }
        let offset = offset.or_else(|| self.offset_of(first.policy_id()));
        Err(error_at(text, message, Some(first.policy_id().to_string()), offset))
    }

    /// Reject any entity literal of type `Tenant` other than `Tenant::"<tenant_slug>"`, in the
    /// scope or in conditions: a tenant's policies cannot reach outside the tenant.
    pub(crate) fn check_tenant(
        &self,
        text: &str,
        tenant_slug: &str,
        vocab: &Vocabulary,
    ) -> Result<(), PolicyValidationError> {
        for (policy, offset) in self.policies.iter().zip(&self.offsets) {
            for uid in policy.entity_literals() {
                if vocab.is_tenant(uid.type_name()) && uid.id().unescaped() != tenant_slug {
                    // Point at the offending id inside this policy when it can be found.
                    let needle = format!("\"{}\"", uid.id().escaped());
                    let at = offset.and_then(|start| {
                        let src = policy.to_cedar()?;
                        Some(start + src.find(&needle).unwrap_or(0))
                    });
                    return Err(error_at(
                        text,
                        format!(
                            "policy `{}` names {uid}, outside this tenant; a policy may only name Tenant::\"{}\"",
                            policy.id(),
                            tenant_slug.escape_default()
                        ),
                        Some(policy.id().to_string()),
                        at,
                    ));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::line_col;

    #[test]
    fn line_col_is_one_based_in_chars() {
        let t = "ab\nçd\nef";
        assert_eq!(line_col(t, 0), (1, 1));
        assert_eq!(line_col(t, 3), (2, 1));
        assert_eq!(line_col(t, 5), (2, 2));
        assert_eq!(line_col(t, 100), (3, 3));
    }
}
