//! Telemetry: the Prometheus registry with one `Metrics` struct per subsystem, and logging set-up.
//!
//! Every metric is named `meshd_*`, in base units, and carries only bounded labels (never a path, a client
//! address or an id). Each agent owns its own registry, so several agents in one test process do not mix.

pub mod logging;
pub mod metrics;
pub mod requests;
pub mod trace;

pub use metrics::{Direction, Metrics};
