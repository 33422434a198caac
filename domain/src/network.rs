//! What a tenant allow-lists for its `http:` tasks: networks (an IP address or a CIDR, parsed
//! strictly into its canonical form: `10.0.0.0/8`, `127.0.0.1/32`, `fd00::/8`) and host names
//! (`build.corp.example`, or every name under a domain: `*.corp.example`).
//!
//! HTTP tasks refuse private, loopback and link-local addresses. A tenant may allow-list the
//! networks its tasks need inside its own infrastructure; the check applies to the address
//! actually connected. A host name opens less: the private networks (10/8, 172.16/12,
//! 192.168/16, 100.64/10, fc00::/7) for that name alone, never loopback or link-local (the
//! worker's own services, a cloud's metadata address), which only a network entry opens. A name
//! is trusted as far as its DNS answers, so it is the narrower grant.

use core::fmt;
use core::net::IpAddr;
use core::str::FromStr;

/// Most entries in one allow-list.
pub const MAX_ENTRIES: usize = 64;

/// An allow-listed network: an address and a prefix length, with no bits set after the prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct AllowedNetwork {
    addr: IpAddr,
    prefix: u8,
}

/// Why an entry is not a network.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct NetworkError(String);

impl AllowedNetwork {
    /// Parses `a.b.c.d`, `a.b.c.d/n`, an IPv6 address, or `ipv6/n`. A bare address is a network
    /// of one (`/32` or `/128`). Refused: host names, spaces, a prefix longer than the address,
    /// a prefix with a sign or leading zeros, `/0` (every address), and bits set after the
    /// prefix (the message names the network meant).
    pub fn parse(text: &str) -> Result<Self, NetworkError> {
        let err = |why: String| Err(NetworkError(why));
        if text.is_empty() {
            return err("must not be empty".into());
        }
        if text.chars().any(char::is_whitespace) {
            return err(format!("`{text}` must not contain spaces"));
        }
        let (addr_text, prefix_text) = match text.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (text, None),
        };
        let Ok(addr) = IpAddr::from_str(addr_text) else {
            return err(format!("`{text}` is not an IP address or CIDR"));
        };
        let max: u8 = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix_text {
            None => max,
            Some(p) => {
                let digits_only = !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit());
                let leading_zero = p.len() > 1 && p.starts_with('0');
                match p.parse::<u8>() {
                    Ok(n) if digits_only && !leading_zero && n <= max => n,
                    _ => return err(format!("`{text}`: the prefix length must be a number from 1 to {max}")),
                }
            }
        };
        if prefix == 0 {
            return err(format!("`{text}` would allow every address; list the networks the tasks need"));
        }
        let network = Self { addr: mask(addr, prefix), prefix };
        if network.addr != addr {
            return err(format!("`{text}` has bits set after the prefix; the network is `{network}`"));
        }
        Ok(network)
    }

    /// The network address.
    pub fn addr(self) -> IpAddr {
        self.addr
    }

    /// The prefix length.
    pub fn prefix(self) -> u8 {
        self.prefix
    }
}

/// `addr` with every bit after `prefix` cleared.
fn mask(addr: IpAddr, prefix: u8) -> IpAddr {
    match addr {
        IpAddr::V4(v4) => {
            let keep = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V4((u32::from(v4) & keep).into())
        }
        IpAddr::V6(v6) => {
            let keep = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V6((u128::from(v6) & keep).into())
        }
    }
}

impl fmt::Display for AllowedNetwork {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl FromStr for AllowedNetwork {
    type Err = NetworkError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// A host name whose private addresses a tenant's `http:` tasks may reach: exact
/// (`build.corp.example`) or every name under a domain (`*.corp.example`, which does not match
/// `corp.example` itself). Stored lower-case, without a trailing dot.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct AllowedHost {
    /// The name, or the domain after `*.`.
    name: String,
    /// Whether it is `*.name`.
    wildcard: bool,
}

impl AllowedHost {
    /// Parses a DNS name (letters, digits and hyphens in dot-separated labels of 1 to 63
    /// characters, no label starting or ending with a hyphen, at most 253 characters), with an
    /// optional leading `*.`. Refused: a last label of digits only (such a "name" is an IPv4
    /// address to URL parsers), a wildcard anywhere else, a wildcard over a single label
    /// (`*.com`), and anything with a scheme, port or path.
    pub fn parse(text: &str) -> Result<Self, NetworkError> {
        let err = |why: &str| Err(NetworkError(format!("`{text}` {why}")));
        let lower = text.to_ascii_lowercase();
        let lower = lower.strip_suffix('.').unwrap_or(&lower);
        let (wildcard, name) = match lower.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, lower),
        };
        if name.is_empty() || name.len() > 253 {
            return err("is not a host name (1 to 253 characters)");
        }
        let labels: Vec<&str> = name.split('.').collect();
        for label in &labels {
            let valid = !label.is_empty()
                && label.len() <= 63
                && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-');
            if !valid {
                return err("is not an IP address, CIDR or host name (a host name is labels of letters, digits and \
                     hyphens separated by dots; `*.` may only lead)");
            }
        }
        if labels.last().is_some_and(|l| l.bytes().all(|b| b.is_ascii_digit())) {
            return err("is not an IP address or CIDR, and a host name cannot end in a number");
        }
        if wildcard && labels.len() < 2 {
            return err("would allow every name under a top-level domain; name the tenant's own domain");
        }
        Ok(Self { name: name.to_owned(), wildcard })
    }

    /// Whether `host` (a name as a URL carries it) is this name, or under this domain.
    pub fn matches(&self, host: &str) -> bool {
        let host = host.to_ascii_lowercase();
        let host = host.strip_suffix('.').unwrap_or(&host);
        if self.wildcard {
            host.strip_suffix(self.name.as_str()).is_some_and(|head| head.len() > 1 && head.ends_with('.'))
        } else {
            host == self.name
        }
    }
}

impl fmt::Display for AllowedHost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.wildcard { write!(f, "*.{}", self.name) } else { f.write_str(&self.name) }
    }
}

/// One entry of a tenant's HTTP allow-list.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum AllowEntry {
    /// Addresses inside a network.
    Network(AllowedNetwork),
    /// The private addresses of a host name.
    Host(AllowedHost),
}

impl AllowEntry {
    /// Parses an address or CIDR ([`AllowedNetwork::parse`]), else a host name
    /// ([`AllowedHost::parse`]). Text that is neither is told what is wrong with it as an
    /// address when it looks like one (digits and dots only, or a `:` or `/`, or empty or with
    /// spaces), so `10.0.0.0/33` is told about its prefix; else as a host name.
    pub fn parse(text: &str) -> Result<Self, NetworkError> {
        let as_network = match AllowedNetwork::parse(text) {
            Ok(network) => return Ok(Self::Network(network)),
            Err(e) => e,
        };
        let looks_like_address = text.is_empty()
            || text.bytes().all(|b| b.is_ascii_digit() || b == b'.')
            || text.contains([':', '/'])
            || text.chars().any(char::is_whitespace);
        match AllowedHost::parse(text) {
            Ok(host) => Ok(Self::Host(host)),
            Err(_) if looks_like_address => Err(as_network),
            Err(e) => Err(e),
        }
    }

    /// Parses a whole list: each entry must parse (the error gives the index of the first bad
    /// one); duplicates are dropped; at most [`MAX_ENTRIES`].
    pub fn parse_list<S: AsRef<str>>(entries: &[S]) -> Result<Vec<Self>, (Option<usize>, NetworkError)> {
        if entries.len() > MAX_ENTRIES {
            return Err((None, NetworkError(format!("at most {MAX_ENTRIES} entries"))));
        }
        let mut out: Vec<Self> = Vec::with_capacity(entries.len());
        for (i, e) in entries.iter().enumerate() {
            let n = Self::parse(e.as_ref()).map_err(|err| (Some(i), err))?;
            if !out.contains(&n) {
                out.push(n);
            }
        }
        Ok(out)
    }
}

impl fmt::Display for AllowEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Network(n) => n.fmt(f),
            Self::Host(h) => h.fmt(f),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn ok(s: &str) -> String {
        AllowedNetwork::parse(s).map_or_else(|e| format!("error: {e}"), |n| n.to_string())
    }

    fn bad(s: &str) -> String {
        match AllowedNetwork::parse(s) {
            Ok(n) => format!("unexpectedly parsed as {n}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn addresses_and_networks_parse_to_their_canonical_form() {
        assert_eq!(ok("127.0.0.1"), "127.0.0.1/32");
        assert_eq!(ok("127.0.0.1/32"), "127.0.0.1/32");
        assert_eq!(ok("10.0.0.0/8"), "10.0.0.0/8");
        assert_eq!(ok("192.168.4.0/24"), "192.168.4.0/24");
        assert_eq!(ok("::1"), "::1/128");
        assert_eq!(ok("FD00::/8"), "fd00::/8");
        assert_eq!(ok("fe80:0:0:0::/10"), "fe80::/10");
        assert_eq!(ok("::ffff:10.0.0.0/104"), "::ffff:10.0.0.0/104");
    }

    #[test]
    fn anything_else_is_refused_with_the_entry_named() {
        assert!(bad("").contains("empty"));
        assert!(bad("internal.example.com").contains("`internal.example.com` is not an IP address"));
        assert!(bad(" 10.0.0.1").contains("spaces"));
        assert!(bad("10.0.0.1 /8").contains("spaces"));
        assert!(bad("10.0.0.0/33").contains("1 to 32"));
        assert!(bad("fd00::/129").contains("1 to 128"));
        assert!(bad("10.0.0.0/").contains("prefix"));
        assert!(bad("10.0.0.0/+8").contains("prefix"));
        assert!(bad("10.0.0.0/08").contains("prefix"));
        assert!(bad("10.0.0.0/8/8").contains("prefix"));
        assert!(bad("0.0.0.0/0").contains("every address"));
        assert!(bad("::/0").contains("every address"));
        assert!(bad("10.1.2.3/8").contains("the network is `10.0.0.0/8`"));
        assert!(bad("fd00::1/8").contains("the network is `fd00::/8`"));
        assert!(bad("010.0.0.1").contains("not an IP address"));
        assert!(bad("10.0.0").contains("not an IP address"));
        assert!(bad("http://10.0.0.1/").contains("not an IP address"));
        assert!(bad("[::1]").contains("not an IP address"));
    }

    #[test]
    fn lists_report_the_first_bad_index_drop_duplicates_and_are_bounded() {
        let list = AllowEntry::parse_list(&[
            "127.0.0.1",
            "10.0.0.0/8",
            "127.0.0.1/32",
            "Build.Corp.Example.",
            "build.corp.example",
        ]);
        assert_eq!(
            list.map(|l| l.iter().map(ToString::to_string).collect::<Vec<_>>()),
            Ok(vec!["127.0.0.1/32".to_owned(), "10.0.0.0/8".to_owned(), "build.corp.example".to_owned()])
        );
        let Err((index, e)) = AllowEntry::parse_list(&["10.0.0.0/8", "no_pe"]) else {
            panic!("a bad entry must be refused");
        };
        assert_eq!(index, Some(1));
        assert!(e.to_string().contains("`no_pe`"));
        let many: Vec<String> = (0..=MAX_ENTRIES).map(|i| format!("10.0.{i}.0/24")).collect();
        assert!(AllowEntry::parse_list(&many).is_err_and(|(i, _)| i.is_none()));
    }

    fn entry(s: &str) -> String {
        AllowEntry::parse(s).map_or_else(|e| format!("error: {e}"), |n| n.to_string())
    }

    #[test]
    fn host_names_parse_to_lower_case_and_are_told_from_addresses() {
        assert_eq!(entry("10.0.0.0/8"), "10.0.0.0/8");
        assert_eq!(entry("fd00::/8"), "fd00::/8");
        assert_eq!(entry("Build.Corp.Example."), "build.corp.example");
        assert_eq!(entry("*.corp.example"), "*.corp.example");
        assert_eq!(entry("localhost"), "localhost");
        assert_eq!(entry("xn--bcher-kva.example"), "xn--bcher-kva.example");
        // A name may start with a digit.
        assert_eq!(entry("1password.corp.example"), "1password.corp.example");
        assert_eq!(entry("*.4th.corp.example"), "*.4th.corp.example");
        // Address-like text is judged as an address.
        assert!(entry("10.0.0.0/33").contains("1 to 32"));
        assert!(entry("10.0.0").contains("not an IP address"));
        for (text, says) in [
            ("*.com", "top-level domain"),
            ("*", "is not an IP address, CIDR or host name"),
            ("a.*.example", "`*.` may only lead"),
            ("-a.example", "hyphens"),
            ("a-.example", "hyphens"),
            ("a..example", "labels"),
            ("under_score.example", "labels"),
            ("example.123", "cannot end in a number"),
            ("http://build.example", "not an IP address"),
            ("build.example:8080", "not an IP address"),
            ("build.example/path", "not an IP address"),
            ("b\u{fc}cher.example", "labels"),
        ] {
            let e = AllowEntry::parse(text).map_or_else(|e| e.to_string(), |n| format!("parsed as {n}"));
            assert!(e.contains(says), "{text:?}: {e}");
            assert!(e.contains(&format!("`{text}`")), "{text:?}: {e}");
        }
        let long = format!("{}.example", "a".repeat(64));
        assert!(entry(&long).contains("labels"));
        let too_long = vec!["a".repeat(63); 5].join(".");
        assert!(entry(&too_long).contains("253"));
    }

    #[test]
    fn a_host_entry_matches_its_name_or_the_names_under_its_domain() {
        let exact = AllowedHost::parse("build.corp.example").unwrap();
        assert!(exact.matches("build.corp.example"));
        assert!(exact.matches("BUILD.corp.example."));
        assert!(!exact.matches("x.build.corp.example"));
        assert!(!exact.matches("corp.example"));
        assert!(!exact.matches("evilbuild.corp.example"));
        let under = AllowedHost::parse("*.corp.example").unwrap();
        assert!(under.matches("build.corp.example"));
        assert!(under.matches("a.b.corp.example"));
        assert!(!under.matches("corp.example"));
        assert!(!under.matches("evilcorp.example"));
        assert!(!under.matches(".corp.example"));
        assert!(!under.matches("corp.example.attacker.example"));
    }
}
