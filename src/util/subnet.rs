//! An IP subnet written as `ADDR/PREFIX` (`10.213.0.0/20`, `fd00::/64`), for `node.advertise_addr` on hosts
//! whose address is only known by the network it is on (a Swarm overlay, a DHCP LAN).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Subnet {
    net: IpAddr,
    prefix: u8,
}

impl Subnet {
    /// Whether `ip` is inside this subnet (same family, same leading `prefix` bits).
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.net, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }

    /// An address inside the subnet other than its network address, to ask the kernel which local address
    /// it would use toward the subnet (the one on the interface that carries it).
    pub fn probe(&self) -> IpAddr {
        match self.net {
            IpAddr::V4(n) if self.prefix < 31 => IpAddr::from(Ipv4Addr::from(u32::from(n) | 1)),
            IpAddr::V6(n) if self.prefix < 127 => IpAddr::from(Ipv6Addr::from(u128::from(n) | 1)),
            other => other,
        }
    }
}

impl FromStr for Subnet {
    type Err = String;

    fn from_str(s: &str) -> Result<Subnet, String> {
        let (addr, prefix) = s
            .split_once('/')
            .ok_or_else(|| "not ADDRESS/PREFIX".to_string())?;
        let net: IpAddr = addr
            .parse()
            .map_err(|_| format!("{addr:?} is not an IP address"))?;
        let max = if net.is_ipv4() { 32 } else { 128 };
        let prefix: u8 = prefix
            .parse()
            .ok()
            .filter(|p| (1..=max).contains(p))
            .ok_or_else(|| format!("prefix {prefix:?}: use 1 to {max}"))?;
        let subnet = Subnet { net, prefix };
        if !subnet.contains(net) || subnet.canonical() != net {
            return Err(format!(
                "{addr} has bits set past /{prefix}: write the network address ({}/{prefix})",
                subnet.canonical()
            ));
        }
        Ok(subnet)
    }
}

impl Subnet {
    fn canonical(&self) -> IpAddr {
        match self.net {
            IpAddr::V4(n) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                IpAddr::from(Ipv4Addr::from(u32::from(n) & mask))
            }
            IpAddr::V6(n) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                IpAddr::from(Ipv6Addr::from(u128::from(n) & mask))
            }
        }
    }
}

impl fmt::Display for Subnet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.net, self.prefix)
    }
}

impl serde::Serialize for Subnet {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_matches() {
        let s: Subnet = "10.213.0.0/20".parse().unwrap();
        assert!(s.contains("10.213.15.255".parse().unwrap()));
        assert!(!s.contains("10.213.16.1".parse().unwrap()));
        assert!(!s.contains("::1".parse().unwrap()));
        assert_eq!(s.probe(), "10.213.0.1".parse::<IpAddr>().unwrap());
        let v6: Subnet = "fd00:1::/64".parse().unwrap();
        assert!(v6.contains("fd00:1::9".parse().unwrap()));
        assert!(!v6.contains("fd00:2::9".parse().unwrap()));
        let all: Subnet = "0.0.0.0/1".parse().unwrap();
        assert!(all.contains("127.0.0.1".parse().unwrap()));
    }

    #[test]
    fn refuses_what_is_not_a_network() {
        for bad in [
            "10.0.0.0",
            "10.0.0.0/33",
            "10.0.0.0/0",
            "10.0.0.1/8",
            "x/8",
            "::/129",
            "10.0.0.0/x",
        ] {
            assert!(bad.parse::<Subnet>().is_err(), "{bad}");
        }
    }
}
