//! Tests: pipelines.
