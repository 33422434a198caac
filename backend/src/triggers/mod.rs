//! Run triggers other than an API call: signed webhooks and cron schedules. Both start runs
//! through [`crate::service::runs::start_run`] with an idempotency key, so a repeated delivery
//! or a schedule fired by several servers starts one run.

pub mod cron;
pub mod webhook;

pub use cron::{Fired, Scheduler, spawn_scheduler};
