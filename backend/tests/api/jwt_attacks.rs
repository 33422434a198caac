//! Tests: jwt_attacks.
