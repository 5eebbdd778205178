//! meshd: a service mesh agent for Docker hosts and bare VMs.
//!
//! # Layout
//! - [`config`]: the TOML schema, defaults and validation (every problem at once, with key paths).
//! - [`app`]: wiring — binds listeners, spawns subsystems, drains on shutdown.
//! - [`discovery`]: this host's endpoint set: static entries, and Docker containers by their labels.
//! - [`policy`]: pure traffic-policy state machines (balancers, breakers, budgets, limits, faults, routes).
//! - [`routing`]: the merged service → endpoints table; its sole writer publishes `watch` snapshots.
//! - [`proxy`]: outbound (from local apps) and inbound (from peer agents) HTTP/1.1, h2 and gRPC proxying.
//! - [`admin`]: the admin API — health, readiness, metrics, services and config views.
//! - [`telemetry`]: the metrics registry, logging, and distributed tracing (trace context, span exporters).
//! - [`reload`]: SIGHUP and `POST /v1/reload`: re-read, validate, publish or refuse.
//! - [`shutdown`]: signals and the two-phase stop.
//! - [`tls`]: the mesh PKI and node identities for mutual TLS between agents.
//!
//! Data flows one way: discovery → routing table → proxy.

#![forbid(unsafe_code)]

pub mod admin;
pub mod app;
pub mod cli;
pub mod config;
pub mod discovery;
pub mod membership;
pub mod policy;
pub mod proxy;
pub mod readiness;
pub mod reload;
pub mod routing;
pub mod shutdown;
pub mod sysctl;
pub mod systemd;
pub mod telemetry;
pub mod tls;
pub mod util;
