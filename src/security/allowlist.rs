//! SSRF protection: which prefillers a request may name.
//!
//! The prefiller header is client input, so without a check any client could make the sidecar
//! POST to any host. When protection is on, a prefiller is allowed only if it matches a static
//! rule (`-allowed-prefillers`) or is a `podIP:port` of the InferencePool (kept current by
//! `inference_pool.rs`). Host names are never resolved here: a DNS answer can change between
//! the check and the connect, so only IP literals match IP and CIDR rules.

use std::collections::HashSet;
use std::net::IpAddr;
use std::sync::Arc;

use tokio::sync::watch;

use crate::upstream::Target;

/// `podIP:port` pairs the InferencePool allows right now.
pub type PoolSet = Arc<HashSet<(IpAddr, u16)>>;

/// One `-allowed-prefillers` entry: `HOST[:PORT]`, `IP[:PORT]` or `CIDR[:PORT]`
/// (IPv6 in brackets when a port follows: `[fd00::/8]:8000`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    host: HostRule,
    port: Option<u16>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum HostRule {
    Name(String),
    Net { addr: IpAddr, prefix: u8 },
}

impl std::str::FromStr for Rule {
    type Err = String;

    fn from_str(entry: &str) -> Result<Self, String> {
        let bad = || format!("'{entry}' is not HOST[:PORT] or CIDR[:PORT]");
        let entry = entry.trim();
        let (host, port) = if let Some(rest) = entry.strip_prefix('[') {
            let (host, after) = rest.split_once(']').ok_or_else(bad)?;
            let port = match after.strip_prefix(':') {
                Some(p) => Some(p.parse::<u16>().map_err(|_| bad())?),
                None if after.is_empty() => None,
                None => return Err(bad()),
            };
            (host, port)
        } else if entry.matches(':').count() == 1 {
            let (host, p) = entry.split_once(':').ok_or_else(bad)?;
            (host, Some(p.parse::<u16>().map_err(|_| bad())?))
        } else {
            (entry, None)
        };
        if host.is_empty() {
            return Err(bad());
        }
        let host = match host.split_once('/') {
            Some((ip, prefix)) => {
                let addr: IpAddr = ip.parse().map_err(|_| bad())?;
                let prefix: u8 = prefix.parse().map_err(|_| bad())?;
                let max = if addr.is_ipv4() { 32 } else { 128 };
                if prefix > max {
                    return Err(bad());
                }
                HostRule::Net { addr, prefix }
            }
            None => match host.parse::<IpAddr>() {
                Ok(addr) => HostRule::Net {
                    addr,
                    prefix: if addr.is_ipv4() { 32 } else { 128 },
                },
                Err(_) => HostRule::Name(host.to_ascii_lowercase()),
            },
        };
        Ok(Rule { host, port })
    }
}

impl Rule {
    fn matches(&self, host: &TargetHost<'_>, port: u16) -> bool {
        if self.port.is_some_and(|p| p != port) {
            return false;
        }
        match (&self.host, host) {
            (HostRule::Name(n), TargetHost::Name(h)) => n.eq_ignore_ascii_case(h),
            (HostRule::Net { addr, prefix }, TargetHost::Ip(ip)) => in_net(*ip, *addr, *prefix),
            _ => false,
        }
    }
}

fn in_net(ip: IpAddr, net: IpAddr, prefix: u8) -> bool {
    match (ip, net) {
        (IpAddr::V4(ip), IpAddr::V4(net)) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
            u32::from(ip) & mask == u32::from(net) & mask
        }
        (IpAddr::V6(ip), IpAddr::V6(net)) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
            u128::from(ip) & mask == u128::from(net) & mask
        }
        _ => false,
    }
}

enum TargetHost<'a> {
    Ip(IpAddr),
    Name(&'a str),
}

/// The allowlist a request is checked against.
#[derive(Clone, Default)]
pub struct Allowlist {
    enabled: bool,
    rules: Vec<Rule>,
    /// Updated by the InferencePool watcher; `None` without Kubernetes.
    pool: Option<watch::Receiver<PoolSet>>,
}

impl Allowlist {
    /// No protection: every prefiller is allowed (the Go sidecar's default).
    pub fn disabled() -> Self {
        Self::default()
    }

    /// Protection on, with static `rules` and optionally the InferencePool's live set.
    pub fn new(rules: Vec<Rule>, pool: Option<watch::Receiver<PoolSet>>) -> Self {
        Self {
            enabled: true,
            rules,
            pool,
        }
    }

    /// Whether requests may use `target` as their prefiller.
    pub fn allows(&self, target: &Target) -> bool {
        if !self.enabled {
            return true;
        }
        let raw = target.host();
        let unbracketed = raw.trim_start_matches('[').trim_end_matches(']');
        let host = match unbracketed.parse::<IpAddr>() {
            Ok(ip) => TargetHost::Ip(ip),
            Err(_) => TargetHost::Name(raw),
        };
        let port = target.port();
        if self.rules.iter().any(|r| r.matches(&host, port)) {
            return true;
        }
        match (&host, &self.pool) {
            (TargetHost::Ip(ip), Some(pool)) => pool.borrow().contains(&(*ip, port)),
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(s: &str) -> Target {
        Target::http(s.parse().unwrap())
    }

    fn list(rules: &[&str]) -> Allowlist {
        Allowlist::new(rules.iter().map(|r| r.parse().unwrap()).collect(), None)
    }

    #[test]
    fn disabled_allows_everything() {
        assert!(Allowlist::disabled().allows(&target("evil.example.com:80")));
    }

    #[test]
    fn ports_are_checked_when_given() {
        let a = list(&["10.0.0.5:8000", "prefill.ns.svc:8200"]);
        assert!(a.allows(&target("10.0.0.5:8000")));
        assert!(!a.allows(&target("10.0.0.5:22")));
        assert!(a.allows(&target("PREFILL.ns.svc:8200")));
        assert!(!a.allows(&target("prefill.ns.svc:8000")));
    }

    #[test]
    fn cidrs_match_ip_literals_only() {
        let a = list(&["10.244.0.0/16", "[fd00::/8]:8000"]);
        assert!(a.allows(&target("10.244.3.7:9999")));
        assert!(!a.allows(&target("10.245.0.1:8000")));
        assert!(a.allows(&target("[fd00::1]:8000")));
        assert!(!a.allows(&target("[fd00::1]:8001")));
        assert!(!a.allows(&target("[::1]:8000")));
        // A name that might resolve into the range is not trusted.
        assert!(!a.allows(&target("internal.example:8000")));
    }

    #[test]
    fn the_pool_set_allows_exact_ip_and_port() {
        let (tx, rx) = watch::channel(PoolSet::default());
        let a = Allowlist::new(vec![], Some(rx));
        assert!(!a.allows(&target("10.1.2.3:8000")));
        tx.send_replace(Arc::new(HashSet::from([(
            "10.1.2.3".parse().unwrap(),
            8000,
        )])));
        assert!(a.allows(&target("10.1.2.3:8000")));
        assert!(!a.allows(&target("10.1.2.3:8001")));
    }

    #[test]
    fn bad_rules_are_rejected() {
        for bad in [
            "",
            "10.0.0.0/33",
            "host:port",
            "[::1",
            "[::1]x",
            "1.2.3.4/x",
        ] {
            assert!(bad.parse::<Rule>().is_err(), "{bad}");
        }
        assert!("::1".parse::<Rule>().is_ok());
    }
}
