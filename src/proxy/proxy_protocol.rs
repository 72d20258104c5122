//! PROXY protocol version 2 headers, as the inbound side writes them to an application tunnel.
//!
//! Input: the tunnelled connection's source (the HBONE peer's address), its target (the CONNECT
//! authority) and the peer's SPIFFE identity. Output: one binary header (HAProxy's
//! `proxy-protocol.txt`, section 2.2): the 12-byte signature, version 2 + command PROXY (`0x21`),
//! TCP over IPv4 (`0x11`) or IPv6 (`0x21`), the length of what follows, both addresses and ports,
//! then one TLV of type [`TLV_SOURCE_IDENTITY`] (`0xD0`, istio's) holding `spiffe://td/ns/x/sa/y`.
//! Mixed families are written as IPv6 with the IPv4 address mapped, since one header carries one
//! family.

use std::net::{IpAddr, SocketAddr};

use crate::identity::Identity;

/// The v2 signature: `\r\n\r\n\0\r\nQUIT\n`.
pub const SIGNATURE: [u8; 12] = [
    0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A,
];

/// Istio's TLV type for the source workload's SPIFFE identity (documented in istio's
/// `workload.proto`; its `0xD1`, the target service hostname, is not written, as ztunnel does not).
pub const TLV_SOURCE_IDENTITY: u8 = 0xD0;

/// Version 2 (high nibble), command PROXY (low nibble).
const VERSION_2_PROXY: u8 = 0x21;
/// AF_INET (high nibble) over STREAM (low nibble).
const TCP_OVER_IPV4: u8 = 0x11;
/// AF_INET6 over STREAM.
const TCP_OVER_IPV6: u8 = 0x21;

/// The header for a connection from `src` to `dst`, with the source identity TLV when known.
pub fn encode(src: SocketAddr, dst: SocketAddr, identity: Option<&Identity>) -> Vec<u8> {
    let identity = identity.map(|i| i.to_string());
    let tlv_len = identity.as_ref().map_or(0, |i| 3 + i.len());
    let mut out = Vec::with_capacity(16 + 36 + tlv_len);
    out.extend_from_slice(&SIGNATURE);
    out.push(VERSION_2_PROXY);
    let v4 = match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => Some((s, d)),
        _ => None,
    };
    let (family, addr_len) = match v4 {
        Some(_) => (TCP_OVER_IPV4, 12),
        None => (TCP_OVER_IPV6, 36),
    };
    out.push(family);
    // Identities are short (a few hundred bytes at most); the length field has 16 bits.
    let len = u16::try_from(addr_len + tlv_len).unwrap_or(u16::MAX);
    out.extend_from_slice(&len.to_be_bytes());
    match v4 {
        Some((s, d)) => {
            out.extend_from_slice(&s.octets());
            out.extend_from_slice(&d.octets());
        }
        None => {
            out.extend_from_slice(&as_v6(src.ip()).octets());
            out.extend_from_slice(&as_v6(dst.ip()).octets());
        }
    }
    out.extend_from_slice(&src.port().to_be_bytes());
    out.extend_from_slice(&dst.port().to_be_bytes());
    if let Some(id) = identity {
        out.push(TLV_SOURCE_IDENTITY);
        out.extend_from_slice(&(id.len() as u16).to_be_bytes());
        out.extend_from_slice(id.as_bytes());
    }
    out
}

fn as_v6(ip: IpAddr) -> std::net::Ipv6Addr {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_header_with_identity_is_laid_out_as_the_spec_says() {
        let id: Identity = "spiffe://cluster.local/ns/default/sa/sleep"
            .parse()
            .unwrap();
        let got = encode(
            "10.0.0.1:40000".parse().unwrap(),
            "10.96.0.10:80".parse().unwrap(),
            Some(&id),
        );
        let ident = b"spiffe://cluster.local/ns/default/sa/sleep";
        assert_eq!(ident.len(), 42);
        let mut want = Vec::new();
        // Signature (spec 2.2: "\x0D\x0A\x0D\x0A\x00\x0D\x0A\x51\x55\x49\x54\x0A").
        want.extend_from_slice(&[
            0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A,
        ]);
        // \x2 version, \x1 PROXY; \x1 AF_INET, \x1 STREAM.
        want.extend_from_slice(&[0x21, 0x11]);
        // Length: 12 address bytes + TLV (1 type + 2 length + 42 value) = 57, network order.
        want.extend_from_slice(&[0x00, 57]);
        // src_addr 10.0.0.1, dst_addr 10.96.0.10, src_port 40000 (0x9c40), dst_port 80.
        want.extend_from_slice(&[10, 0, 0, 1, 10, 96, 0, 10, 0x9c, 0x40, 0x00, 0x50]);
        // TLV: type 0xD0, length 42, then the identity.
        want.extend_from_slice(&[0xD0, 0x00, 42]);
        want.extend_from_slice(ident);
        assert_eq!(got, want);
    }

    #[test]
    fn ipv6_and_mixed_families_use_the_ipv6_block() {
        let got = encode(
            "[fd00::1]:1".parse().unwrap(),
            "10.0.0.2:8080".parse().unwrap(),
            None,
        );
        assert_eq!(&got[..12], &SIGNATURE);
        assert_eq!(got[12], 0x21);
        // \x2 AF_INET6, \x1 STREAM; 36 address bytes, no TLV.
        assert_eq!(got[13], 0x21);
        assert_eq!(&got[14..16], &[0, 36]);
        assert_eq!(got.len(), 16 + 36);
        let src: std::net::Ipv6Addr = "fd00::1".parse().unwrap();
        assert_eq!(&got[16..32], &src.octets());
        let dst: std::net::Ipv6Addr = "::ffff:10.0.0.2".parse().unwrap();
        assert_eq!(&got[32..48], &dst.octets());
        assert_eq!(&got[48..52], &[0, 1, 0x1f, 0x90]);
    }
}
