//! Upgrades and restarts that no open connection notices (issue 17).
//!
//! Today a new node proxy started beside the old one takes over the pods' listeners (SO_REUSEPORT), and
//! every connection the old one still holds is cut when its drain deadline passes. The goal is that the
//! old process hands each open connection to the new one instead, which carries on with it. This module
//! holds the pieces of that, one per concern:
//!
//! - [`handover`] — moving app-facing sockets, with what each connection needs to continue (addresses,
//!   peer identity, bytes buffered in each direction, an opaque tunnel-resumption blob), from the old
//!   process to the new one over a unix socket. Independent of how the tunnel side is resumed.
//! - [`hold`] — the CNI agent's side of a restart without overlap: it holds what the leaving proxy
//!   handed over until the new one listens, then hands it on.

pub mod handover;
pub mod hold;
