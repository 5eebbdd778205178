//! Small shared pieces with no dependencies on the rest of meshd: durations as the config writes them, and one
//! jittered exponential [`Backoff`](backoff::Backoff), the tokio runtime for a number of threads.

pub mod backoff;
pub mod duration;
pub mod runtime;
pub mod subnet;

pub use backoff::Backoff;

/// `Box::pin(make())`, with the heap memory taken before `make` runs: the compiler can then have `make` build
/// its value (a large future) straight in the box, instead of on the stack and copying it over.
#[inline(always)]
pub fn boxed<T>(make: impl FnOnce() -> T) -> std::pin::Pin<Box<T>> {
    let slot = Box::new_uninit();
    Box::into_pin(Box::write(slot, make()))
}
