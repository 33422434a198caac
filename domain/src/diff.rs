//! Differences between two versions of a pipeline definition.

use serde::Serialize;
use similar::TextDiff;

use crate::spec::PipelineSpec;

/// Ids added, removed and changed between two versions.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ChangeSet {
    /// Ids only in the newer version, in its order.
    pub added: Vec<String>,
    /// Ids only in the older version, in its order.
    pub removed: Vec<String>,
    /// Ids in both whose definition differs, in the newer version's order.
    pub changed: Vec<String>,
}

impl ChangeSet {
    /// Whether nothing was added, removed or changed.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty() && self.changed.is_empty()
    }
}

/// The difference between two definitions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SpecDiff {
    /// Unified diff of the canonical YAML forms (empty when they are equal).
    pub unified: String,
    /// Stages by id. A stage counts as changed when anything in it differs, its tasks included.
    pub stages: ChangeSet,
    /// Tasks by id (ids are unique across a pipeline). A task moved to another stage counts as
    /// changed.
    pub tasks: ChangeSet,
}

fn change_set<'a, T: PartialEq + 'a>(
    from: impl Iterator<Item = (&'a str, T)>,
    to: impl Iterator<Item = (&'a str, T)>,
) -> ChangeSet {
    let from: Vec<(&str, T)> = from.collect();
    let to: Vec<(&str, T)> = to.collect();
    let old: std::collections::HashMap<&str, &T> = from.iter().map(|(id, v)| (*id, v)).collect();
    let new: std::collections::HashMap<&str, &T> = to.iter().map(|(id, v)| (*id, v)).collect();
    let mut set = ChangeSet::default();
    for (id, value) in &to {
        match old.get(id) {
            None => set.added.push((*id).to_owned()),
            Some(before) if *before != value => set.changed.push((*id).to_owned()),
            Some(_) => {}
        }
    }
    for (id, _) in &from {
        if !new.contains_key(id) {
            set.removed.push((*id).to_owned());
        }
    }
    set
}

/// Compares two definitions. `from_label` and `to_label` are the unified diff's header names,
/// used verbatim (`--- {from_label}` / `+++ {to_label}`), e.g. `v3` and `v4`.
#[must_use]
pub fn diff(from: &PipelineSpec, to: &PipelineSpec, from_label: &str, to_label: &str) -> SpecDiff {
    let old_text = from.canonical_yaml();
    let new_text = to.canonical_yaml();
    let unified = if old_text == new_text {
        String::new()
    } else {
        TextDiff::from_lines(&old_text, &new_text)
            .unified_diff()
            .context_radius(3)
            .header(from_label, to_label)
            .to_string()
    };
    let stages =
        change_set(from.stages.iter().map(|s| (s.id.as_str(), s)), to.stages.iter().map(|s| (s.id.as_str(), s)));
    let tasks = change_set(
        from.tasks().map(|(s, t)| (t.id.as_str(), (&s.id, t))),
        to.tasks().map(|(s, t)| (t.id.as_str(), (&s.id, t))),
    );
    SpecDiff { unified, stages, tasks }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::spec::parse_definition;

    const V1: &str = "
stages:
  - id: build
    tasks:
      - id: compile
        run: [cargo, build]
      - id: lint
        run: [cargo, clippy]
  - id: old
    tasks:
      - id: gone
        noop: true
";

    const V2: &str = "
stages:
  - id: build
    tasks:
      - id: compile
        run: [cargo, build, --release]
      - id: lint
        run: [cargo, clippy]
  - id: deploy
    needs: [build]
    tasks:
      - id: ship
        shell: ./ship.sh
";

    #[test]
    fn reports_changes() {
        let from = parse_definition(V1).unwrap();
        let to = parse_definition(V2).unwrap();
        let d = diff(&from, &to, "v1", "v2");
        assert!(d.unified.starts_with("--- v1\n+++ v2\n"), "{}", d.unified);
        assert!(d.unified.contains("+          - \"--release\""), "{}", d.unified);
        assert_eq!(d.stages.added, ["deploy"]);
        assert_eq!(d.stages.removed, ["old"]);
        assert_eq!(d.stages.changed, ["build"]);
        assert_eq!(d.tasks.added, ["ship"]);
        assert_eq!(d.tasks.removed, ["gone"]);
        assert_eq!(d.tasks.changed, ["compile"]);
        let json = serde_json::to_value(&d).unwrap();
        assert_eq!(json["tasks"]["added"][0], "ship");
    }

    #[test]
    fn identical_specs_have_empty_diff() {
        let spec = parse_definition(V1).unwrap();
        let d = diff(&spec, &spec.clone(), "v1", "v2");
        assert!(d.unified.is_empty());
        assert!(d.stages.is_empty() && d.tasks.is_empty());
    }
}
