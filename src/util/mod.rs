//! Small shared pieces with no dependencies on the rest of meshd: durations as the config writes them, and one
//! jittered exponential [`Backoff`](backoff::Backoff), the tokio runtime for a number of threads.

pub mod backoff;
pub mod duration;
pub mod runtime;
pub mod subnet;

pub use backoff::Backoff;
