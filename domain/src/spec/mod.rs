//! Pipeline definitions: the typed model, parsing from YAML or JSON with located errors,
//! validation, and the canonical YAML form with its content hash.

mod error;
mod model;
mod parse;
mod validate;

#[cfg(test)]
mod tests;

use sha2::{Digest, Sha256};

pub use error::{SpecError, SpecErrors};
pub use model::{
    Backoff, Concurrency, GateSpec, HttpMethod, HttpSpec, OnConflict, OnTimeout, ParamSpec, ParamType, PipelineSpec,
    Resources, RetrySpec, StageSpec, TaskAction, TaskSpec, Trigger, When,
};
pub use parse::{MAX_DEFINITION_BYTES, parse_definition};
pub use validate::{MAX_APPROVALS, MAX_NEEDS, MAX_PRIORITY, MAX_RETRIES, MAX_STAGES, MAX_TASKS, MAX_TRIGGERS};

use crate::doc;

impl PipelineSpec {
    /// The canonical YAML form: fields in declaration order, defaults left out, user maps
    /// sorted by key, strings quoted whenever plain style could be misread. Deterministic,
    /// and `parse_definition(&spec.canonical_yaml())` gives back `spec` for any valid spec.
    #[must_use]
    pub fn canonical_yaml(&self) -> String {
        match doc::ser::to_node(self) {
            Ok(tree) => doc::emit::to_yaml(&tree),
            // Unreachable for these types: every map key serializes as a string.
            Err(error) => format!("# canonical form unavailable: {error}\n"),
        }
    }

    /// Lowercase hex SHA-256 of [`canonical_yaml`](Self::canonical_yaml).
    #[must_use]
    pub fn content_hash(&self) -> String {
        hex::encode(Sha256::digest(self.canonical_yaml().as_bytes()))
    }

    /// Runs the semantic checks of [`parse_definition`] on a spec obtained another way
    /// (deserialized directly, or built in code). Errors have paths but no positions.
    ///
    /// # Errors
    /// [`SpecErrors`] listing every problem found.
    pub fn validate(&self) -> Result<(), SpecErrors> {
        let problems = validate::validate(self);
        if problems.is_empty() { Ok(()) } else { Err(parse::finish(problems, None)) }
    }

    /// Finds a stage by id.
    #[must_use]
    pub fn stage(&self, id: &str) -> Option<&StageSpec> {
        self.stages.iter().find(|s| s.id.as_str() == id)
    }

    /// All tasks with their stage, in definition order.
    pub fn tasks(&self) -> impl Iterator<Item = (&StageSpec, &TaskSpec)> {
        self.stages.iter().flat_map(|s| s.tasks.iter().map(move |t| (s, t)))
    }
}
