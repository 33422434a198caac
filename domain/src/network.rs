//! Networks a tenant allow-lists for its `http:` tasks: an IP address or a CIDR, parsed strictly
//! into its canonical form (`10.0.0.0/8`, `127.0.0.1/32`, `fd00::/8`).
//!
//! HTTP tasks refuse private, loopback and link-local addresses; a tenant may allow-list the
//! networks its tasks need inside its own infrastructure. The check applies to the address
//! actually connected, so entries are addresses and networks, never host names.

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
            return err(format!(
                "`{text}` is not an IP address or CIDR (host names cannot be allow-listed: the check \
                 applies to the address actually connected)"
            ));
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

#[cfg(test)]
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
        assert!(bad("localhost").contains("host names"));
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
        let list = AllowedNetwork::parse_list(&["127.0.0.1", "10.0.0.0/8", "127.0.0.1/32"]);
        assert_eq!(
            list.map(|l| l.iter().map(ToString::to_string).collect::<Vec<_>>()),
            Ok(vec!["127.0.0.1/32".to_owned(), "10.0.0.0/8".to_owned()])
        );
        let Err((index, e)) = AllowedNetwork::parse_list(&["10.0.0.0/8", "nope"]) else {
            panic!("a bad entry must be refused");
        };
        assert_eq!(index, Some(1));
        assert!(e.to_string().contains("`nope`"));
        let many: Vec<String> = (0..=MAX_ENTRIES).map(|i| format!("10.0.{i}.0/24")).collect();
        assert!(AllowedNetwork::parse_list(&many).is_err_and(|(i, _)| i.is_none()));
    }
}
