//! Which addresses an `Http` task may connect to.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Whether `ip` is a publicly routable unicast address. Refused (non-public): unspecified, loopback,
/// private (10/8, 172.16/12, 192.168/16), CGNAT 100.64/10, link-local (169.254/16, fe80::/10), 0/8,
/// IETF/documentation/benchmarking ranges, multicast, reserved 240/4 and broadcast; for IPv6 also
/// unique-local fc00::/7, site-local fec0::/10, multicast, documentation 2001:db8::/32, and every form that
/// embeds an IPv4 address (IPv4-mapped `::ffff:a.b.c.d`, IPv4-compatible `::a.b.c.d`, NAT64 64:ff9b::/96 and
/// 64:ff9b:1::/48, 6to4 2002::/16, Teredo 2001::/32) is judged by that IPv4 address.
pub fn ip_is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4_is_public(v4),
        IpAddr::V6(v6) => v6_is_public(v6),
    }
}

fn v4_is_public(ip: Ipv4Addr) -> bool {
    let [a, b, c, _] = ip.octets();
    !(a == 0                                   // 0.0.0.0/8 "this network"
        || v4_is_private_network(ip)           // 10/8, 172.16/12, 192.168/16, CGNAT 100.64/10
        || a == 127                            // loopback
        || (a == 169 && b == 254)              // link-local (cloud metadata)
        || (a == 192 && b == 0 && c == 0)      // IETF protocol assignments
        || (a == 192 && b == 0 && c == 2)      // TEST-NET-1
        || (a == 192 && b == 88 && c == 99)    // 6to4 relay anycast
        || (a == 198 && (b == 18 || b == 19))  // benchmarking
        || (a == 198 && b == 51 && c == 100)   // TEST-NET-2
        || (a == 203 && b == 0 && c == 113)    // TEST-NET-3
        || a >= 224) // multicast 224/4, reserved 240/4, broadcast
}

fn v6_is_public(ip: Ipv6Addr) -> bool {
    let seg = ip.segments();
    if let Some(v4) = embedded_v4(ip) {
        return v4_is_public(v4);
    }
    if ip.is_unspecified() || ip.is_loopback() {
        return false;
    }
    let s0 = seg[0];
    !(v6_is_unique_local(ip)         // unique-local fc00::/7
        || (s0 & 0xffc0) == 0xfe80   // link-local fe80::/10
        || (s0 & 0xffc0) == 0xfec0   // site-local fec0::/10 (deprecated)
        || (s0 & 0xff00) == 0xff00   // multicast
        || (s0 == 0x2001 && seg[1] == 0x0db8) // documentation
        || (s0 == 0x0100 && seg[1] == 0 && seg[2] == 0 && seg[3] == 0) // discard-only 100::/64
        || seg[..6] == [0, 0, 0, 0, 0, 0]) // rest of ::/96 (IPv4-compatible, handled above) and friends
}

/// The IPv4 address carried inside an IPv6 one (mapped, compatible, NAT64, 6to4, Teredo).
fn embedded_v4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    let seg = ip.segments();
    let o = ip.octets();
    let tail = Ipv4Addr::new(o[12], o[13], o[14], o[15]);
    if let Some(v4) = ip.to_ipv4_mapped() {
        return Some(v4);
    }
    if seg[..6] == [0, 0, 0, 0, 0, 0] && !ip.is_unspecified() && !ip.is_loopback() {
        return Some(tail); // IPv4-compatible ::a.b.c.d (deprecated)
    }
    if seg[..6] == [0x64, 0xff9b, 0, 0, 0, 0] || (seg[0] == 0x64 && seg[1] == 0xff9b && seg[2] == 1) {
        return Some(tail); // NAT64 (the local-use /48 is checked by its last 32 bits, a common layout)
    }
    if seg[0] == 0x2002 {
        return Some(Ipv4Addr::new(o[2], o[3], o[4], o[5])); // 6to4
    }
    if seg[0] == 0x2001 && seg[1] == 0 {
        // Teredo: the client address is stored inverted in the last 32 bits.
        return Some(Ipv4Addr::new(!o[12], !o[13], !o[14], !o[15]));
    }
    None
}

fn in_cidr(ip: IpAddr, net: IpAddr, prefix: u8) -> bool {
    match (ip, net) {
        (IpAddr::V4(ip), IpAddr::V4(net)) => {
            let p = u32::from(prefix.min(32));
            let mask = if p == 0 { 0 } else { u32::MAX << (32 - p) };
            u32::from(ip) & mask == u32::from(net) & mask
        }
        (IpAddr::V6(ip), IpAddr::V6(net)) => {
            let p = u32::from(prefix.min(128));
            let mask = if p == 0 { 0 } else { u128::MAX << (128 - p) };
            u128::from(ip) & mask == u128::from(net) & mask
        }
        (IpAddr::V6(ip), IpAddr::V4(_)) => ip.to_ipv4_mapped().is_some_and(|v4| in_cidr(IpAddr::V4(v4), net, prefix)),
        (IpAddr::V4(_), IpAddr::V6(_)) => false,
    }
}

/// Whether an `Http` task may connect to `ip`: public, or inside one of the `allow` CIDRs.
pub fn ip_permitted(ip: IpAddr, allow: &[(IpAddr, u8)]) -> bool {
    ip_is_public(ip) || allow.iter().any(|&(net, prefix)| in_cidr(ip, net, prefix))
}

/// Whether `ip` is in a private network an allow-listed host name may reach: 10/8, 172.16/12,
/// 192.168/16, CGNAT 100.64/10 or unique-local fc00::/7 (an IPv4 address also in its mapped
/// IPv6 form). Never loopback, link-local or anything else that is not public.
pub fn ip_is_private_network(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(ip) => v4_is_private_network(ip),
        IpAddr::V6(ip) => match ip.to_ipv4_mapped() {
            Some(mapped) => v4_is_private_network(mapped),
            None => v6_is_unique_local(ip),
        },
    }
}

/// 10/8, 172.16/12, 192.168/16 and CGNAT 100.64/10.
fn v4_is_private_network(ip: Ipv4Addr) -> bool {
    let [a, b, _, _] = ip.octets();
    a == 10 || (a == 172 && (16..32).contains(&b)) || (a == 192 && b == 168) || (a == 100 && (64..128).contains(&b))
}

/// Unique-local fc00::/7.
fn v6_is_unique_local(ip: Ipv6Addr) -> bool {
    (ip.segments()[0] & 0xfe00) == 0xfc00
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED))
    }

    #[test]
    fn classification() {
        for s in [
            "0.0.0.0",
            "0.1.2.3",
            "10.0.0.1",
            "100.64.0.1",
            "100.127.255.255",
            "127.0.0.1",
            "127.255.0.9",
            "169.254.169.254",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "224.0.0.1",
            "239.255.255.250",
            "255.255.255.255",
            "240.0.0.1",
            "::",
            "::1",
            "fe80::1",
            "febf::1",
            "fc00::1",
            "fd12:3456::1",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "::ffff:10.1.2.3",
            "::127.0.0.1",
            "::a9fe:a9fe",
            "64:ff9b::a9fe:a9fe",
            "2002:a9fe:a9fe::1",
            "2001:db8::1",
        ] {
            assert!(!ip_is_public(ip(s)), "{s} must be refused");
        }
        for s in
            ["1.1.1.1", "8.8.8.8", "100.128.0.1", "172.32.0.1", "2606:4700::1111", "::ffff:8.8.8.8", "93.184.216.34"]
        {
            assert!(ip_is_public(ip(s)), "{s} must be public");
        }
    }

    #[test]
    fn host_names_reach_private_networks_only() {
        for s in ["10.1.2.3", "172.16.0.1", "172.31.255.254", "192.168.1.1", "100.64.0.1", "fd00::1", "::ffff:10.0.0.1"]
        {
            assert!(ip_is_private_network(ip(s)), "{s}");
        }
        for s in [
            "127.0.0.1",
            "::1",
            "169.254.169.254",
            "fe80::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "0.0.0.0",
            "224.0.0.1",
            "172.32.0.1",
            "8.8.8.8",
        ] {
            assert!(!ip_is_private_network(ip(s)), "{s}");
        }
    }

    #[test]
    fn allow_list() {
        let allow = [(ip("127.0.0.0"), 8), (ip("fd00::"), 8)];
        assert!(ip_permitted(ip("127.0.0.1"), &allow));
        assert!(ip_permitted(ip("::ffff:127.0.0.2"), &allow));
        assert!(ip_permitted(ip("fd00::5"), &allow));
        assert!(!ip_permitted(ip("::1"), &allow));
        assert!(!ip_permitted(ip("10.0.0.1"), &allow));
        assert!(!ip_permitted(ip("169.254.169.254"), &[(ip("169.254.0.0"), 17)]));
        assert!(ip_permitted(ip("169.254.169.254"), &[(ip("169.254.0.0"), 16)]));
    }
}
