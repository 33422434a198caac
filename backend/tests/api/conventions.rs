//! Tests: conventions.
