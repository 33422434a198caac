//! Sluice's pure core: ids, pipeline specifications and their validation, the DAG, the run
//! planner, template expressions, and the Cedar vocabulary. No I/O, no async runtime, no
//! framework types; builds for wasm32 too.
//!
//! Entry points: [`spec::parse_definition`] (YAML or JSON text → validated
//! [`spec::PipelineSpec`] or located [`spec::SpecErrors`]), [`spec::PipelineSpec::canonical_yaml`]
//! and [`spec::PipelineSpec::content_hash`] for versioning, [`diff::diff`] between versions,
//! and [`dag`] for graph algorithms. [`plan::compile`] turns a spec and run parameters into a
//! [`plan::RunPlan`], and [`plan::plan`] is the pure run state machine (event in, effects out);
//! [`template`] parses and renders `{{ … }}` expressions.

pub mod cedar;
pub mod dag;
pub mod diff;
mod doc;
pub mod duration;
pub mod ids;
pub mod memory;
pub mod network;
pub mod plan;
pub mod schedule;
pub mod spec;
pub mod template;

pub use duration::Duration;
pub use ids::{IdError, NodeId, Slug};
pub use memory::MemorySize;
pub use spec::{PipelineSpec, SpecError, SpecErrors, parse_definition};
