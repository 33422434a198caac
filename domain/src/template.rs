//! Template expressions (in progress).
