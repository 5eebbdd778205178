//! Logging with `tracing`: `log.level` and `log.format` from the config, `RUST_LOG` overriding the level.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::config::{LogConfig, LogFormat};

/// Installs the global subscriber. Safe to call more than once (later calls are ignored), so tests may call it.
pub fn init(cfg: &LogConfig) {
    let filter = match std::env::var("RUST_LOG") {
        Ok(v) if !v.trim().is_empty() => EnvFilter::try_new(v).unwrap_or_else(|e| {
            eprintln!(
                "meshd: RUST_LOG is not a valid filter ({e}); using log.level {:?}",
                cfg.level
            );
            EnvFilter::new(&cfg.level)
        }),
        _ => EnvFilter::new(&cfg.level),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let _ = match cfg.format {
        LogFormat::Json => builder.json().with_current_span(true).try_init(),
        LogFormat::Text => builder.try_init(),
    };
}
