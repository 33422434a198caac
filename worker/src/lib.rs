//! Task execution for Sluice workers (in progress).
