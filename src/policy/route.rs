//! Ordered routes (match a path prefix and/or headers → another service) and weighted splits (canaries,
//! blue/green). Both pick the service whose endpoints a request goes to, before balancing.

use http::HeaderMap;

#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct SplitTarget {
    pub service: String,
    pub weight: u32,
}

#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Route {
    /// Lowercased header name → exact value; every one must match.
    pub headers: Vec<(String, String)>,
    pub path_prefix: Option<String>,
    pub service: String,
}

impl Route {
    fn matches(&self, path: &str, headers: &HeaderMap) -> bool {
        if let Some(prefix) = &self.path_prefix
            && !path.starts_with(prefix.as_str())
        {
            return false;
        }
        self.headers.iter().all(|(name, value)| {
            headers
                .get_all(name.as_str())
                .iter()
                .any(|v| v.as_bytes() == value.as_bytes())
        })
    }
}

/// The service a request goes to: the first matching route's, else a weighted pick from `split` with
/// `r` ∈ [0, 1), else `None` (the requested service itself).
pub fn target<'a>(
    routes: &'a [Route],
    split: &'a [SplitTarget],
    path: &str,
    headers: &HeaderMap,
    r: f64,
) -> Option<&'a str> {
    if let Some(route) = routes.iter().find(|rt| rt.matches(path, headers)) {
        return Some(&route.service);
    }
    let total: u64 = split.iter().map(|s| s.weight as u64).sum();
    if total == 0 {
        return None;
    }
    let mut n = ((r.clamp(0.0, 1.0) * total as f64) as u64).min(total - 1);
    for s in split {
        if n < s.weight as u64 {
            return Some(&s.service);
        }
        n -= s.weight as u64;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split() -> Vec<SplitTarget> {
        vec![
            SplitTarget {
                service: "v1".into(),
                weight: 90,
            },
            SplitTarget {
                service: "v2".into(),
                weight: 10,
            },
        ]
    }

    #[test]
    fn split_by_weight() {
        let h = HeaderMap::new();
        let n = 10_000;
        let v2 = (0..n)
            .filter(|i| target(&[], &split(), "/", &h, *i as f64 / n as f64) == Some("v2"))
            .count();
        assert_eq!(v2, 1000);
        assert_eq!(target(&[], &[], "/", &h, 0.5), None);
    }

    #[test]
    fn routes_first_in_order() {
        let routes = vec![
            Route {
                headers: vec![("x-canary".into(), "1".into())],
                path_prefix: None,
                service: "canary".into(),
            },
            Route {
                headers: vec![],
                path_prefix: Some("/api/".into()),
                service: "api".into(),
            },
        ];
        let mut h = HeaderMap::new();
        assert_eq!(target(&routes, &split(), "/api/x", &h, 0.0), Some("api"));
        assert_eq!(target(&routes, &split(), "/other", &h, 0.0), Some("v1"));
        h.insert("x-canary", "1".parse().unwrap());
        assert_eq!(target(&routes, &split(), "/api/x", &h, 0.0), Some("canary"));
        h.insert("x-canary", "2".parse().unwrap());
        assert_eq!(target(&routes, &[], "/nope", &h, 0.0), None);
    }
}
