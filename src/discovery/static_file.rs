//! Static discovery: endpoints listed in `[[discovery.static]]` (and `meshd dev --service`).

use crate::config::StaticService;
use crate::routing::{DEFAULT_WEIGHT, EndpointSpec};

/// The endpoint set the static entries describe.
pub fn endpoints(entries: &[StaticService]) -> Vec<EndpointSpec> {
    let mut out: Vec<EndpointSpec> = entries
        .iter()
        .flat_map(|s| {
            s.endpoints.iter().map(move |addr| EndpointSpec {
                service: s.service.clone(),
                addr: *addr,
                protocol: s.protocol,
                weight: DEFAULT_WEIGHT,
            })
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Protocol;

    #[test]
    fn flattens_and_dedups() {
        let e = endpoints(&[
            StaticService {
                service: "a".into(),
                endpoints: vec![
                    "10.0.0.1:80".parse().unwrap(),
                    "10.0.0.1:80".parse().unwrap(),
                ],
                protocol: Protocol::Http,
            },
            StaticService {
                service: "b".into(),
                endpoints: vec!["10.0.0.2:80".parse().unwrap()],
                protocol: Protocol::Grpc,
            },
        ]);
        assert_eq!(e.len(), 2);
        assert_eq!(e[1].protocol, Protocol::Grpc);
    }
}
