//! The run planner (in progress).
