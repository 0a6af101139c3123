//! Where a webhook may go: https URLs (http only to hosts the operator allowed), never to private,
//! loopback or link-local addresses unless the host is allowed. Checked when an endpoint is added
//! and again at every delivery against the address actually connected to (DNS may change).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use url::Url;

use crate::error::{LedgerError, Result};

const MAX_URL: usize = 2048;

/// Parses and checks an endpoint URL (syntax and scheme; addresses are checked by [`resolve`]).
pub fn parse_url(raw: &str, allowed_hosts: &[String]) -> Result<Url> {
    if raw.len() > MAX_URL {
        return Err(LedgerError::invalid(format!(
            "url is longer than {MAX_URL} characters"
        )));
    }
    let url = Url::parse(raw).map_err(|e| LedgerError::invalid(format!("url {raw:?}: {e}")))?;
    // The URL is stored and checked again at each delivery as parsed, with spaces and non-ASCII
    // bytes percent-encoded: one that grew past the cap was accepted, then never delivered to.
    if url.as_str().len() > MAX_URL {
        return Err(LedgerError::invalid(format!(
            "url is longer than {MAX_URL} characters once encoded ({})",
            url.as_str().len()
        )));
    }
    let host = url
        .host_str()
        .ok_or_else(|| LedgerError::invalid(format!("url {raw:?} has no host")))?;
    if !url.username().is_empty() || url.password().is_some() {
        return Err(LedgerError::invalid(
            "url must not carry credentials; the signature authenticates the ledger",
        ));
    }
    match url.scheme() {
        "https" => {}
        "http" if is_allowed(host, allowed_hosts) => {}
        "http" => {
            return Err(LedgerError::invalid(format!(
            "url must be https (http only to hosts allowed by --alerts-allow-host; {host} is not)"
        )))
        }
        other => {
            return Err(LedgerError::invalid(format!(
                "url scheme {other:?} is not https"
            )))
        }
    }
    Ok(url)
}

/// Parses one `--alerts-allow-host` entry: a host name or an IP address, nothing else (no scheme,
/// port, path or wildcard: the entry is compared with a URL's host as written).
pub fn parse_allowed_host(text: &str) -> std::result::Result<String, String> {
    let text = text.trim();
    let bare = text.trim_start_matches('[').trim_end_matches(']');
    if bare.parse::<IpAddr>().is_ok() {
        return Ok(bare.to_ascii_lowercase());
    }
    let refuse = |why: &str| Err(format!("allowed host {text:?} {why}"));
    if text.is_empty() {
        return refuse("is empty");
    }
    if text.contains("://") || text.contains(['/', ':', '@', '*', '?', '#']) {
        return refuse(
            "must be a bare host name or IP address (no scheme, port, path or wildcard)",
        );
    }
    match url::Host::parse(text) {
        Ok(url::Host::Domain(name)) => Ok(name),
        Ok(other) => Ok(other.to_string()),
        Err(e) => refuse(&format!("is not a host name: {e}")),
    }
}

fn is_allowed(host: &str, allowed_hosts: &[String]) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    allowed_hosts.iter().any(|a| a.eq_ignore_ascii_case(host))
}

/// Resolves the URL's host and returns the addresses that may be connected to; refuses when any
/// resolved address is private (a name that resolves to one public and one private address could
/// be steered to the private one). Every failure is `INVALID_ARGUMENT` (adding an endpoint); a
/// delivery tells a failed lookup from a refused address ([`Resolved`]).
pub async fn resolve(
    url: &Url,
    allowed_hosts: &[String],
    within: Duration,
) -> Result<Vec<SocketAddr>> {
    match lookup(url, allowed_hosts, within).await {
        Resolved::Addrs(addrs) => Ok(addrs),
        Resolved::Unresolved(e) | Resolved::Refused(e) => Err(LedgerError::invalid(e)),
    }
}

/// What a delivery's lookup found.
pub enum Resolved {
    /// Addresses that may be connected to.
    Addrs(Vec<SocketAddr>),
    /// The name did not resolve (DNS failing or slow for a moment, or the name gone): worth
    /// trying again on the retry schedule, like a connection that failed.
    Unresolved(String),
    /// The URL or an address it resolves to may not be called: no retry will change that.
    Refused(String),
}

/// The lookup takes at most `within` (the deliveries' request timeout): a name whose DNS hangs
/// held a delivery, and an endpoint's adding, for as long as it hung.
pub async fn lookup(url: &Url, allowed_hosts: &[String], within: Duration) -> Resolved {
    let Some(host) = url.host_str() else {
        return Resolved::Refused("url has no host".into());
    };
    let Some(port) = url.port_or_known_default() else {
        return Resolved::Refused("url has no port".into());
    };
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let addrs: Vec<SocketAddr> =
        match tokio::time::timeout(within, tokio::net::lookup_host((bare, port))).await {
            Ok(Ok(addrs)) => addrs.collect(),
            Ok(Err(e)) => return Resolved::Unresolved(format!("cannot resolve {host}: {e}")),
            Err(_) => return Resolved::Unresolved(format!("cannot resolve {host}: timed out")),
        };
    if addrs.is_empty() {
        return Resolved::Unresolved(format!("{host} resolves to nothing"));
    }
    if !is_allowed(host, allowed_hosts) {
        // The address itself is not said: any account may add an endpoint, and naming what an
        // internal name resolves to would map the ledger's network for it.
        if addrs.iter().any(|a| !is_public(a.ip())) {
            return Resolved::Refused(format!(
                "{host} resolves to a private, loopback or reserved address (allow the host with \
                 --alerts-allow-host for local use)"
            ));
        }
    }
    Resolved::Addrs(addrs)
}

/// Whether an address is on the public internet.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => is_public_v4(v4),
            None => is_public_v6(v6),
        },
    }
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    let [a, b, ..] = ip.octets();
    !(ip.is_private()
        || ip.is_loopback()
        || ip.is_link_local()
        || ip.is_unspecified()
        || ip.is_broadcast()
        || ip.is_multicast()
        || ip.is_documentation()
        || a == 0
        // IETF protocol assignments 192.0.0.0/24 (DS-Lite, NAT64 discovery and the like).
        || (a == 192 && b == 0 && ip.octets()[2] == 0)
        // Carrier-grade NAT 100.64.0.0/10 and benchmarking 198.18.0.0/15.
        || (a == 100 && (64..128).contains(&b))
        || (a == 198 && (18..20).contains(&b))
        || a >= 240)
}

fn is_public_v6(ip: Ipv6Addr) -> bool {
    let s = ip.segments();
    let first = s[0];
    // Forms that carry an IPv4 address a gateway may reach: NAT64 64:ff9b::/96 (RFC 6052, and
    // the local-use 64:ff9b:1::/48), 6to4 2002::/16 and the deprecated IPv4-compatible ::/96.
    // Each is public only if the IPv4 address inside is.
    let embedded = |hi: u16, lo: u16| Ipv4Addr::from((u32::from(hi) << 16) | u32::from(lo));
    if first == 0x64 && s[1] == 0xff9b {
        return s[2..6] == [0; 4] && is_public_v4(embedded(s[6], s[7]));
    }
    if first == 0x2002 {
        return is_public_v4(embedded(s[1], s[2]));
    }
    if s[..6] == [0; 6] {
        return !ip.is_loopback() && !ip.is_unspecified() && is_public_v4(embedded(s[6], s[7]));
    }
    // IPv4-translated ::ffff:0:0/96 (SIIT, RFC 6145): an IPv4 address too.
    if s[..4] == [0; 4] && s[4] == 0xffff && s[5] == 0 {
        return is_public_v4(embedded(s[6], s[7]));
    }
    !(ip.is_loopback()
        || ip.is_unspecified()
        || ip.is_multicast()
        // Unique local fc00::/7, link-local fe80::/10, the deprecated site-local fec0::/10,
        // documentation 2001:db8::/32, and Teredo 2001::/32, which tunnels to an IPv4 address
        // (obfuscated inside it) that no webhook receiver needs.
        || (first & 0xfe00) == 0xfc00
        || (first & 0xffc0) == 0xfe80
        || (first & 0xffc0) == 0xfec0
        || (first == 0x2001 && (s[1] == 0x0db8 || s[1] == 0)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Long enough for a lookup here (a name that does not exist answers at once).
    const LOOKUP_TIME: Duration = Duration::from_secs(5);

    #[test]
    fn private_and_reserved_addresses_are_not_public() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "::1",
            "fd00::1",
            "fe80::1",
            "::ffff:127.0.0.1",
            // IPv4 inside NAT64, 6to4 and IPv4-compatible addresses.
            "64:ff9b::10.0.0.1",
            "64:ff9b::a9fe:a9fe",
            "64:ff9b:1::1",
            "2002:7f00:1::1",
            "2002:c0a8:101::1",
            "::10.0.0.1",
            "::127.0.0.1",
            // IPv4-translated, site-local and the IETF's 192.0.0.0/24.
            "::ffff:0:10.0.0.1",
            "::ffff:0:7f00:1",
            "fec0::1",
            "192.0.0.8",
            // Teredo (an IPv4 address inside, obfuscated).
            "2001:0:4136:e378:8000:63bf:3fff:fdd2",
        ] {
            assert!(!is_public(ip.parse().unwrap()), "{ip} counted as public");
        }
        assert!(is_public("93.184.216.34".parse().unwrap()));
        assert!(is_public("2606:4700::1111".parse().unwrap()));
        assert!(
            is_public("64:ff9b::5db8:d822".parse().unwrap()),
            "NAT64 of a public v4"
        );
        assert!(
            is_public("2002:5db8:d822::1".parse().unwrap()),
            "6to4 of a public v4"
        );
    }

    /// A name that does not resolve is a failure to retry (DNS may be back at the next
    /// attempt); a name that resolves to a private address is refused for good.
    #[tokio::test]
    async fn a_lookup_that_fails_is_not_a_refusal() {
        let gone = Url::parse("https://no-such-host.invalid/hook").expect("url");
        assert!(matches!(
            lookup(&gone, &[], LOOKUP_TIME).await,
            Resolved::Unresolved(_)
        ));
        let private = Url::parse("https://127.0.0.1:9/hook").expect("url");
        assert!(matches!(
            lookup(&private, &[], LOOKUP_TIME).await,
            Resolved::Refused(_)
        ));
        let allowed = ["127.0.0.1".to_string()];
        assert!(matches!(
            lookup(&private, &allowed, LOOKUP_TIME).await,
            Resolved::Addrs(_)
        ));
    }

    #[test]
    fn urls_need_https_unless_allowed() {
        let allowed = vec!["127.0.0.1".to_string()];
        assert!(parse_url("https://hooks.example.com/x", &[]).is_ok());
        assert!(parse_url("http://hooks.example.com/x", &[]).is_err());
        assert!(parse_url("http://127.0.0.1:9/x", &allowed).is_ok());
        assert!(parse_url("ftp://hooks.example.com", &allowed).is_err());
        assert!(parse_url("not a url", &allowed).is_err());
        assert!(parse_url("https://u:p@hooks.example.com", &allowed).is_err());
    }

    #[test]
    fn allowed_hosts_are_bare_names_or_addresses() {
        for (given, kept) in [
            ("127.0.0.1", "127.0.0.1"),
            ("LocalHost", "localhost"),
            ("::1", "::1"),
            ("[::1]", "::1"),
            ("hooks.internal", "hooks.internal"),
        ] {
            assert_eq!(parse_allowed_host(given).as_deref(), Ok(kept));
        }
        for bad in [
            "",
            " ",
            "http://localhost",
            "localhost:8080",
            "localhost/x",
            "*.internal",
            "user@host",
            "bad host",
        ] {
            assert!(parse_allowed_host(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[tokio::test]
    async fn loopback_is_refused_unless_allowed() {
        let url = parse_url("https://127.0.0.1:9/x", &[]).unwrap();
        assert!(resolve(&url, &[], LOOKUP_TIME).await.is_err());
        assert!(resolve(&url, &["127.0.0.1".into()], LOOKUP_TIME)
            .await
            .is_ok());
    }
}
