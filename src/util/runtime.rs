//! The tokio runtime for a number of threads.

/// One thread: a current-thread runtime (every task on the calling thread: no work-stealing queues, no
/// cross-thread wake-ups, no separate worker to hand work to). More: a multi-thread runtime with one worker
/// per thread.
pub fn build(threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    if threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()
    }
}
