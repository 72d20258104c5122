//! AF_UNIX SOCK_SEQPACKET sockets on tokio whose packets carry many SCM_RIGHTS fds: the hand-over's
//! transport.
//!
//! Input: a socket path. Output: [`Listener`] and [`Conn`], whose
//! `send`/`recv` move one whole packet per call with up to [`SCM_MAX_FD`] fds. The mechanics are
//! `zds::packet`'s (socket2 to set sockets up, nix for `sendmsg`/`recvmsg`, tokio's `AsyncFd` for
//! readiness), which carries one fd per packet and reports truncation as an `io::Error`; this one sends a
//! list and hands the truncation flags to the protocol, which names them. Its fd parser (`take_fds`) and
//! reactor registration (`register`), the two `unsafe` steps, are `zds::packet`'s own. Timeouts are the
//! caller's.

use std::io::{self, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::sys::socket::{recvmsg, MsgFlags};
use socket2::{Domain, SockAddr, SockRef, Socket, Type};
use tokio::io::unix::AsyncFd;

use crate::zds::packet::{register, send_packet, take_fds};

/// The most fds one message can carry on Linux (`SCM_MAX_FD`). The control buffer has room for all of them,
/// so only running out of fd numbers can cut a list short (MSG_CTRUNC).
pub(super) const SCM_MAX_FD: usize = super::MAX_FDS_PER_PACKET;

/// Pending connections the kernel queues: one sender at a time is the normal case.
const LISTEN_BACKLOG: i32 = 4;

/// Mode of the socket file: owner only. Whoever can connect can hand us sockets.
const SOCKET_MODE: u32 = 0o600;

/// SO_SNDBUF asked for on both ends. A unix datagram must fit in the sender's buffer (less a little), and
/// the default (`net.core.wmem_default`) may be smaller than a packet on some machines; the kernel doubles
/// the value, capped by `wmem_max`, which is never below this.
const SEND_BUFFER: usize = 2 * super::MAX_PACKET;

/// A listening SOCK_SEQPACKET socket. Dropping it removes the socket file (if it is still ours).
#[derive(Debug)]
pub(super) struct Listener {
    fd: AsyncFd<OwnedFd>,
    path: PathBuf,
    /// Device and inode of the socket file we created, so drop never removes a successor's file.
    file_id: (u64, u64),
}

impl Listener {
    /// Binds at `path` (mode 0600), removing a stale socket file there and refusing to remove anything else.
    pub(super) fn bind(path: &Path) -> io::Result<Listener> {
        match std::fs::symlink_metadata(path) {
            Ok(meta) if meta.file_type().is_socket() => std::fs::remove_file(path)?,
            Ok(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!("{} exists and is not a socket", path.display()),
                ))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let socket = Socket::new(Domain::UNIX, Type::SEQPACKET.nonblocking(), None)?;
        socket.bind(&SockAddr::unix(path)?)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(SOCKET_MODE))?;
        let meta = std::fs::symlink_metadata(path)?;
        socket.listen(LISTEN_BACKLOG)?;
        Ok(Listener {
            fd: register(OwnedFd::from(socket))?,
            path: path.to_path_buf(),
            file_id: (meta.dev(), meta.ino()),
        })
    }

    /// Waits for the next connection.
    pub(super) async fn accept(&self) -> io::Result<Conn> {
        loop {
            let mut guard = self.fd.readable().await?;
            match guard.try_io(|fd| SockRef::from(fd.get_ref()).accept()) {
                Ok(Ok((socket, _peer))) => {
                    socket.set_nonblocking(true)?;
                    return Conn::from_socket(socket);
                }
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
    }

    /// The socket file's path.
    pub(super) fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Ok(meta) = std::fs::symlink_metadata(&self.path) {
            if (meta.dev(), meta.ino()) == self.file_id {
                let _ = std::fs::remove_file(&self.path);
            }
        }
    }
}

/// One packet as `recvmsg` left it: the caller decides what the flags mean. The fds are ours either way.
#[derive(Debug)]
pub(super) struct Incoming {
    /// Bytes received (0 with no fds: the peer closed).
    pub(super) len: usize,
    /// Every fd that arrived, close-on-exec.
    pub(super) fds: Vec<OwnedFd>,
    /// MSG_TRUNC: the packet was longer than the buffer.
    pub(super) truncated: bool,
    /// MSG_CTRUNC: not every fd arrived.
    pub(super) fds_truncated: bool,
}

/// One connected SOCK_SEQPACKET socket.
#[derive(Debug)]
pub(super) struct Conn {
    fd: AsyncFd<OwnedFd>,
}

impl Conn {
    /// Connects to the listener at `path`. A full accept queue fails with `WouldBlock`.
    pub(super) fn connect(path: &Path) -> io::Result<Conn> {
        let socket = Socket::new(Domain::UNIX, Type::SEQPACKET.nonblocking(), None)?;
        socket.connect(&SockAddr::unix(path)?)?;
        Conn::from_socket(socket)
    }

    fn from_socket(socket: Socket) -> io::Result<Conn> {
        // Best effort: a smaller buffer only matters if a packet turns out not to fit (EMSGSIZE).
        let _ = socket.set_send_buffer_size(SEND_BUFFER);
        Ok(Conn {
            fd: register(OwnedFd::from(socket))?,
        })
    }

    /// Sends `msg` as one packet with `fds` (at most [`SCM_MAX_FD`]) in one SCM_RIGHTS message.
    pub(super) async fn send(&self, msg: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
        let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
        send_packet(&self.fd, msg, &raw).await
    }

    /// Receives one packet into `buf`, with every fd it carried.
    pub(super) async fn recv(&self, buf: &mut [u8]) -> io::Result<Incoming> {
        loop {
            let mut guard = self.fd.readable().await?;
            match guard.try_io(|sock| recv_once(sock.get_ref().as_fd(), buf)) {
                Ok(result) => return result,
                Err(_would_block) => continue,
            }
        }
    }
}

/// One `recvmsg` call. Takes ownership of every fd that arrived before looking at anything else, so each
/// one is closed whatever the caller makes of the packet.
fn recv_once(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<Incoming> {
    // Zeroed: `take_fds` relies on the bytes past the last header the kernel wrote being zero.
    let mut control = nix::cmsg_space!([RawFd; SCM_MAX_FD]);
    let mut iov = [IoSliceMut::new(buf)];
    let (len, flags) = {
        let msg = recvmsg::<()>(
            fd.as_raw_fd(),
            &mut iov,
            Some(&mut control),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )?;
        (msg.bytes, msg.flags)
    };
    Ok(Incoming {
        len,
        fds: take_fds(&control),
        truncated: flags.contains(MsgFlags::MSG_TRUNC),
        fds_truncated: flags.contains(MsgFlags::MSG_CTRUNC),
    })
}
