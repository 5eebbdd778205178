//! Durations as the config file writes them: `"250ms"`, `"10s"`, `"1m30s"`, `"1.5s"`, `"2h"`.

use std::time::Duration;

/// The longest duration accepted anywhere in the config.
pub const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

/// Parses durations such as `250ms`, `10s`, `1m30s`, `1.5s`, `2h`.
pub fn parse(s: &str) -> Result<Duration, String> {
    const HINT: &str = "not a duration (use a number and a unit: \"250ms\", \"10s\", \"1m30s\")";
    let s = s.trim();
    if s.is_empty() {
        return Err(HINT.to_string());
    }
    let mut total = 0f64;
    let mut rest = s;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(|| format!("{HINT}: a unit is missing"))?;
        if num_len == 0 {
            return Err(HINT.to_string());
        }
        let n: f64 = rest[..num_len].parse().map_err(|_| HINT.to_string())?;
        rest = &rest[num_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_len] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return Err(HINT.to_string()),
        };
        rest = &rest[unit_len..];
        total += n * scale;
    }
    if !total.is_finite() || total > MAX_DURATION.as_secs_f64() {
        return Err("longer than a year".to_string());
    }
    Ok(Duration::from_secs_f64(total))
}

/// Formats a duration the way the config file writes it.
pub fn format(d: Duration) -> String {
    let ms = d.as_millis();
    if ms.is_multiple_of(1000) && ms > 0 {
        format!("{}s", ms / 1000)
    } else if d.subsec_nanos().is_multiple_of(1_000_000) {
        format!("{ms}ms")
    } else {
        format!("{}us", d.as_micros())
    }
}

/// serde: a duration as the config writes it.
pub fn ser<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format(*d))
}

/// serde: an optional duration as the config writes it, or null.
pub fn ser_opt<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => s.serialize_str(&format(*d)),
        None => s.serialize_none(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_and_formats() {
        assert_eq!(parse("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse(" 2h "), Ok(Duration::from_secs(7200)));
        assert!(parse("10").unwrap_err().contains("unit is missing"));
        assert!(parse("5 parsecs").is_err());
        for bad in ["", "10", "s", "10 s", "1d", "-1s", "1..2s"] {
            assert!(parse(bad).is_err(), "{bad:?} parsed");
        }
        assert!(parse("9999999h").unwrap_err().contains("year"));
        assert_eq!(format(Duration::from_secs(10)), "10s");
        assert_eq!(format(Duration::from_millis(250)), "250ms");
        assert_eq!(format(Duration::from_micros(1500)), "1500us");
        assert_eq!(format(Duration::ZERO), "0ms");
    }

    proptest! {
        #[test]
        fn never_panics_and_stays_bounded(text in "[0-9.e]{0,30}(ns|us|ms|s|m|h|d)?[0-9.]{0,5}(s|m)?") {
            if let Ok(d) = parse(&text) {
                prop_assert!(d <= MAX_DURATION);
            }
        }
    }
}
