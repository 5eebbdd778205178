//! Traffic policies as pure state machines: load balancing, circuit breaking, retry budgets, rate limiting,
//! fault injection, routes and splits.
//!
//! Nothing here does I/O, reads a clock or draws a random number by itself: time (`Instant`) and randomness
//! come in as parameters, so every rule is unit- and property-tested exactly. The proxy owns the wiring.

pub mod balance;
pub mod breaker;
pub mod budget;
pub mod fault;
pub mod ratelimit;
pub mod route;
