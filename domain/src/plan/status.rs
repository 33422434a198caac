//! Status enums of tasks, stages and runs, with their lower snake case names.

use core::fmt;
use core::str::FromStr;

use serde::{Deserialize, Serialize};

/// A string that is not a status name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {kind} status `{value}`")]
pub struct ParseStatusError {
    /// `task`, `stage` or `run`.
    pub kind: &'static str,
    /// The text that did not parse.
    pub value: String,
}

macro_rules! status_enum {
    (
        $(#[$meta:meta])* $name:ident, $kind:literal, terminal: [$($terminal:ident),*],
        { $($(#[$vmeta:meta])* $variant:ident => $text:literal),* $(,)? }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
        #[serde(rename_all = "snake_case")]
        pub enum $name {
            /// Not started yet.
            #[default]
            Pending,
            $($(#[$vmeta])* $variant),*
        }

        impl $name {
            /// Every status, in lifecycle order.
            pub const ALL: &'static [Self] = &[Self::Pending, $(Self::$variant),*];

            /// The lower snake case name, as stored and serialized.
            #[must_use]
            pub const fn as_str(self) -> &'static str {
                match self {
                    Self::Pending => "pending",
                    $(Self::$variant => $text),*
                }
            }

            /// Whether the status is final.
            #[must_use]
            pub const fn is_terminal(self) -> bool {
                matches!(self, $(Self::$terminal)|*)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $name {
            type Err = ParseStatusError;
            fn from_str(text: &str) -> Result<Self, Self::Err> {
                Self::ALL
                    .iter()
                    .copied()
                    .find(|status| status.as_str() == text)
                    .ok_or_else(|| ParseStatusError { kind: $kind, value: text.to_owned() })
            }
        }
    };
}

status_enum!(
    /// Status of a task instance.
    TaskStatus, "task", terminal: [Succeeded, Failed, Cancelled, Skipped], {
        /// Dispatched, not yet picked up by a worker.
        Queued => "queued",
        /// A worker is running it.
        Running => "running",
        /// Finished successfully.
        Succeeded => "succeeded",
        /// Failed, retries exhausted.
        Failed => "failed",
        /// Stopped by a cancel or the run timeout.
        Cancelled => "cancelled",
        /// Not run: its condition was false, or its stage was skipped or rejected.
        Skipped => "skipped",
    }
);

status_enum!(
    /// Status of a stage.
    StageStatus, "stage", terminal: [Succeeded, Failed, Cancelled, Skipped], {
        /// Waiting for its gate to be decided.
        Waiting => "waiting",
        /// Its tasks are being evaluated and run.
        Running => "running",
        /// All its tasks ended, none failed.
        Succeeded => "succeeded",
        /// A task failed, or its gate was rejected.
        Failed => "failed",
        /// Stopped by a cancel or the run timeout.
        Cancelled => "cancelled",
        /// Not run because a stage it needs did not succeed.
        Skipped => "skipped",
    }
);

status_enum!(
    /// Status of a run.
    RunStatus, "run", terminal: [Succeeded, Failed, Cancelled, TimedOut], {
        /// Tasks are queued or running, or retries are pending.
        Running => "running",
        /// Nothing runs; a gate is waiting for a decision.
        Waiting => "waiting",
        /// Every stage succeeded.
        Succeeded => "succeeded",
        /// A stage failed.
        Failed => "failed",
        /// Cancelled.
        Cancelled => "cancelled",
        /// The run timeout passed.
        TimedOut => "timed_out",
    }
);
