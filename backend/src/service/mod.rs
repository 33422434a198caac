//! Operations that change several tables at once, apart from HTTP: creating tenants and users,
//! sessions and refresh tokens.

pub mod accounts;
pub mod runs;
pub mod settings;
