//! Discovery: this host's own endpoint set. Each source emits what it finds to the router as
//! [`crate::routing::Update::SetLocal`]; no routing decisions and no gossip happen here.

pub mod static_file;
