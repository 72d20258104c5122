//! In-pod traffic redirection (nftables over netlink, ip rule + route). Being written.
