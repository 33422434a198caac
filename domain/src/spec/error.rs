//! Errors found in a pipeline definition.

use core::fmt;

use serde::Serialize;

/// One problem in a definition, with where it is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, thiserror::Error)]
pub struct SpecError {
    /// Path of the offending value, such as `stages[1].tasks[0].needs[0]`; empty for the
    /// document as a whole.
    pub path: String,
    /// What is wrong, in words.
    pub message: String,
    /// 1-based line in the source text, when known.
    pub line: Option<u32>,
    /// 1-based column in the source text, when known.
    pub column: Option<u32>,
}

impl SpecError {
    /// Creates an error without a position.
    #[must_use]
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        Self { path: path.into(), message: message.into(), line: None, column: None }
    }
}

impl fmt::Display for SpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !self.path.is_empty() {
            write!(f, "{}: ", self.path)?;
        }
        f.write_str(&self.message)?;
        match (self.line, self.column) {
            (Some(line), Some(column)) => write!(f, " (line {line}, column {column})"),
            (Some(line), None) => write!(f, " (line {line})"),
            _ => Ok(()),
        }
    }
}

/// All problems found in a definition (never empty).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, thiserror::Error)]
#[serde(transparent)]
pub struct SpecErrors(Vec<SpecError>);

impl SpecErrors {
    /// Wraps a list of errors; `None` when the list is empty.
    #[must_use]
    pub fn new(errors: Vec<SpecError>) -> Option<Self> {
        if errors.is_empty() { None } else { Some(Self(errors)) }
    }

    /// A single error.
    #[must_use]
    pub fn single(error: SpecError) -> Self {
        Self(vec![error])
    }

    /// The errors, in document order where known.
    #[must_use]
    pub fn errors(&self) -> &[SpecError] {
        &self.0
    }

    /// The errors, by value.
    #[must_use]
    pub fn into_vec(self) -> Vec<SpecError> {
        self.0
    }
}

impl fmt::Display for SpecErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let count = self.0.len();
        write!(f, "invalid pipeline definition ({count} error{})", if count == 1 { "" } else { "s" })?;
        for error in &self.0 {
            write!(f, "\n  {error}")?;
        }
        Ok(())
    }
}

impl IntoIterator for SpecErrors {
    type Item = SpecError;
    type IntoIter = std::vec::IntoIter<SpecError>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter()
    }
}

impl<'a> IntoIterator for &'a SpecErrors {
    type Item = &'a SpecError;
    type IntoIter = core::slice::Iter<'a, SpecError>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}
