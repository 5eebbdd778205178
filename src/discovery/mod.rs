//! Discovery: this host's own endpoint set. Each source emits what it finds to the router as
//! [`crate::routing::Update::SetLocal`]; no routing decisions and no gossip happen here.
//!
//! - [`static_file`]: `[[discovery.static]]` entries (and `meshd dev --service`), known at start.
//! - [`docker`]: this host's containers, from the Docker Engine API (labels, health, events).

pub mod docker;
pub mod static_file;
