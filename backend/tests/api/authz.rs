//! Tests: authz.
