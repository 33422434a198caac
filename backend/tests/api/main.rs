//! Integration tests: the real server over real HTTP, on SQLite by default or on PostgreSQL when
//! `SLUICE_TEST_DATABASE=postgres` (a fresh database per test on `SLUICE_TEST_POSTGRES_URL`,
//! default `postgres://postgres@127.0.0.1:5432`).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod audit;
mod auth;
mod authz;
mod conventions;
mod cross_tenant;
mod events_bus;
mod helpers;
mod jwt_attacks;
mod openapi;
mod pipelines;
mod runs;
mod scheduling;
mod secrets;
#[path = "../../../tests/common/shared_dir.rs"]
mod shared_dir;
mod store;
mod tenant_settings;
mod tokens;
mod triggers;
mod walkthrough;
mod workers;
