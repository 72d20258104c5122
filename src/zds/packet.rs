//! Async AF_UNIX SOCK_SEQPACKET sockets that carry file descriptors: the transport under ZDS and under the
//! connection hand-over (`upgrade::handover`).
//!
//! Input: a socket path. Output: [`SeqpacketListener`] (agent side) and [`SeqpacketConn`] (both sides), whose
//! `send`/`recv` move one whole packet (one protobuf) per call, optionally with one SCM_RIGHTS fd (ZDS).
//! The hand-over sends up to `SCM_MAX_FD` fds per packet (`send_fds`) and reads packets as `recvmsg` left
//! them (`Incoming`, through `recv_raw`), naming truncation in its own errors.
//! Sockets are created, bound and accepted through `socket2`'s safe API and driven by tokio's [`AsyncFd`];
//! `sendmsg`/`recvmsg` go through `nix`. `unsafe` appears twice: `take_fds`, where fds the kernel
//! installed for us via SCM_RIGHTS become [`OwnedFd`]s, and `register`, tokio's registration of an fd. Timeouts are the caller's business (see `zds::IO_TIMEOUT`).

use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, MsgFlags};
use socket2::{Domain, SockAddr, SockRef, Socket, Type};
use tokio::io::unix::AsyncFd;

/// Pending connections the kernel queues for us. The ZDS accept loop is rate limited (5/s, as istio-cni),
/// and at most two proxies connect at a time (rolling update), so a short queue is plenty. The hand-over's
/// receiver needs room for one (a sender at a time); it checks this at compile time.
pub(crate) const LISTEN_BACKLOG: i32 = 32;

/// The most fds one message can carry on Linux (`SCM_MAX_FD`). The control buffer has room for all of them
/// in one SCM_RIGHTS header (the kernel merges several into one on receive), so a peer cannot make the
/// buffer too small. The kernel still cuts the list short (MSG_CTRUNC) when we run out of fd numbers; the
/// ones it did install are parsed and closed anyway (see [`take_fds`]).
pub(crate) const SCM_MAX_FD: usize = 253;

/// Mode of the socket file: owner (root) only. Whoever can connect receives pod network namespaces.
const SOCKET_MODE: u32 = 0o600;

/// Mode for the socket's parent directory when we have to create it.
const DIR_MODE: u32 = 0o755;

/// A listening SOCK_SEQPACKET socket. Dropping it removes the socket file (if it is still ours).
#[derive(Debug)]
pub struct SeqpacketListener {
    fd: AsyncFd<OwnedFd>,
    path: PathBuf,
    /// Device and inode of the socket file we created, so drop never removes a successor's file.
    file_id: (u64, u64),
}

/// Binds a listener at `path`: creates missing parent directories (mode 0755), removes a stale socket file
/// (refusing to remove anything that is not a socket), and sets the socket file to mode 0600.
pub fn bind(path: &Path) -> io::Result<SeqpacketListener> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(DIR_MODE)
            .create(dir)
            .map_err(|e| with_path(e, "creating directory", dir))?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            std::fs::remove_file(path).map_err(|e| with_path(e, "removing stale socket", path))?
        }
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket", path.display()),
            ))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(with_path(e, "inspecting", path)),
    }
    let socket = Socket::new(Domain::UNIX, Type::SEQPACKET.nonblocking(), None)?;
    socket
        .bind(&SockAddr::unix(path)?)
        .map_err(|e| with_path(e, "binding", path))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(SOCKET_MODE))
        .map_err(|e| with_path(e, "chmod", path))?;
    let meta = std::fs::symlink_metadata(path).map_err(|e| with_path(e, "inspecting", path))?;
    socket.listen(LISTEN_BACKLOG)?;
    Ok(SeqpacketListener {
        fd: register(OwnedFd::from(socket))?,
        path: path.to_path_buf(),
        file_id: (meta.dev(), meta.ino()),
    })
}

impl SeqpacketListener {
    /// Waits for the next connection.
    pub async fn accept(&self) -> io::Result<SeqpacketConn> {
        loop {
            let mut guard = self.fd.readable().await?;
            match guard.try_io(|fd| SockRef::from(fd.get_ref()).accept()) {
                Ok(Ok((socket, _peer))) => {
                    socket.set_nonblocking(true)?;
                    return SeqpacketConn::from_socket(socket);
                }
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
    }

    /// The socket file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for SeqpacketListener {
    fn drop(&mut self) {
        if let Ok(meta) = std::fs::symlink_metadata(&self.path) {
            if (meta.dev(), meta.ino()) == self.file_id {
                let _ = std::fs::remove_file(&self.path);
            }
        }
    }
}

/// One connected SOCK_SEQPACKET socket. `send` and `recv` take `&self`; one task should own each direction.
#[derive(Debug)]
pub struct SeqpacketConn {
    fd: AsyncFd<OwnedFd>,
}

impl SeqpacketConn {
    /// Connects to the listener at `path`. A full accept queue fails with `WouldBlock`; callers retry.
    pub async fn connect(path: &Path) -> io::Result<SeqpacketConn> {
        let socket = Socket::new(Domain::UNIX, Type::SEQPACKET.nonblocking(), None)?;
        socket
            .connect(&SockAddr::unix(path)?)
            .map_err(|e| with_path(e, "connecting to", path))?;
        SeqpacketConn::from_socket(socket)
    }

    /// A connected pair (for tests and in-process use).
    pub fn pair() -> io::Result<(SeqpacketConn, SeqpacketConn)> {
        let (a, b) = Socket::pair(Domain::UNIX, Type::SEQPACKET.nonblocking(), None)?;
        Ok((
            SeqpacketConn::from_socket(a)?,
            SeqpacketConn::from_socket(b)?,
        ))
    }

    fn from_socket(socket: Socket) -> io::Result<SeqpacketConn> {
        Ok(SeqpacketConn {
            fd: register(OwnedFd::from(socket))?,
        })
    }

    /// Sends `msg` as one packet, with `fd` as a single SCM_RIGHTS fd when given.
    pub async fn send(&self, msg: &[u8], fd: Option<BorrowedFd<'_>>) -> io::Result<()> {
        let raw = fd.map(|f| f.as_raw_fd());
        send_packet(&self.fd, msg, raw.as_slice()).await
    }

    /// Sends `msg` as one packet with `fds` (none, or at most [`SCM_MAX_FD`]) in one SCM_RIGHTS message.
    pub(crate) async fn send_fds(&self, msg: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
        let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
        send_packet(&self.fd, msg, &raw).await
    }

    /// Receives one packet into `buf`, with any fds it carried (close-on-exec). `Ok((0, []))` means the peer
    /// closed. A packet longer than `buf` (MSG_TRUNC) or with truncated control data (MSG_CTRUNC) is an
    /// `InvalidData` error; fds received with it are closed.
    pub async fn recv(&self, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
        let capacity = buf.len();
        let incoming = self.recv_raw(buf).await?;
        if incoming.truncated {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "packet longer than {capacity} bytes (MSG_TRUNC) refused; the {} fds it carried are closed",
                    incoming.fds.len()
                ),
            ));
        }
        if incoming.fds_truncated {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "packet whose fds did not all arrive (MSG_CTRUNC: out of fd numbers?) refused; the {} that \
                     did are closed",
                    incoming.fds.len()
                ),
            ));
        }
        Ok((incoming.len, incoming.fds))
    }

    /// Receives one packet into `buf` as `recvmsg` left it: the caller decides what truncation means.
    pub(crate) async fn recv_raw(&self, buf: &mut [u8]) -> io::Result<Incoming> {
        loop {
            let mut guard = self.fd.readable().await?;
            match guard.try_io(|sock| recv_raw(sock.get_ref().as_fd(), buf)) {
                Ok(result) => return result,
                Err(_would_block) => continue,
            }
        }
    }
}

/// One packet as `recvmsg` left it: the caller decides what the flags mean. The fds are ours either way.
#[derive(Debug)]
pub(crate) struct Incoming {
    /// Bytes received (0 with no fds: the peer closed).
    pub(crate) len: usize,
    /// Every fd that arrived, close-on-exec.
    pub(crate) fds: Vec<OwnedFd>,
    /// MSG_TRUNC: the packet was longer than the buffer.
    pub(crate) truncated: bool,
    /// MSG_CTRUNC: not every fd arrived.
    pub(crate) fds_truncated: bool,
}

impl AsFd for SeqpacketConn {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.get_ref().as_fd()
    }
}

/// Sends `msg` as one packet on `sock`, with `fds` (none, or at most `SCM_MAX_FD`) in one SCM_RIGHTS
/// header; waits for the socket to be writable. A partial send is an error (a seqpacket send is whole or
/// nothing, so it means the kernel cut the packet).
async fn send_packet(sock: &AsyncFd<OwnedFd>, msg: &[u8], fds: &[RawFd]) -> io::Result<()> {
    loop {
        let mut guard = sock.writable().await?;
        let sent = guard.try_io(|sock| {
            let iov = [IoSlice::new(msg)];
            let rights = [ControlMessage::ScmRights(fds)];
            let cmsgs: &[ControlMessage<'_>] = if fds.is_empty() { &[] } else { &rights };
            sendmsg::<()>(
                sock.get_ref().as_raw_fd(),
                &iov,
                cmsgs,
                MsgFlags::MSG_NOSIGNAL,
                None,
            )
            .map_err(io::Error::from)
        });
        match sent {
            Ok(Ok(n)) if n == msg.len() => return Ok(()),
            Ok(Ok(n)) => {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    format!("sent {n} of {} bytes", msg.len()),
                ))
            }
            Ok(Err(e)) => return Err(e),
            Err(_would_block) => continue,
        }
    }
}

/// Hands a socket to tokio's reactor. (`AsyncFd::new` is deprecated since tokio 1.52 because it accepts any
/// `AsRawFd`; `register` is its `unsafe` replacement.)
#[allow(unsafe_code)]
fn register(fd: OwnedFd) -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: an OwnedFd is an open fd that only it closes, and its `as_raw_fd` always returns that same fd;
    // the AsyncFd owns it from here until it is dropped.
    unsafe { AsyncFd::register(fd) }.map_err(io::Error::from)
}

/// One `recvmsg` call. Takes ownership of every fd that arrived before looking at anything else, so each one
/// is closed whatever the caller makes of the packet (a truncated one included).
fn recv_raw(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<Incoming> {
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

/// Takes ownership of the fds in every SCM_RIGHTS header of `control`, a zeroed buffer that `recvmsg` filled.
///
/// Parsed here rather than with nix's `cmsgs()`, which refuses to read a buffer flagged MSG_CTRUNC: the
/// kernel sets that flag when it runs out of fd numbers part way through the list, after installing the
/// first ones, which would then leak. The layout is the kernel's `struct cmsghdr` (a `size_t` length that
/// counts the header, then level and type as `int`s, the data right after that rounded up to a `size_t`, the next header at the
/// length rounded up to a `size_t`); a zero length marks the end of what the kernel wrote.
#[allow(unsafe_code)]
fn take_fds(control: &[u8]) -> Vec<OwnedFd> {
    const WORD: usize = std::mem::size_of::<usize>();
    const INT: usize = std::mem::size_of::<i32>();
    // CMSG_LEN(0): the header (length, level, type) rounded up to a size_t.
    let data_at = (WORD + 2 * INT).div_ceil(WORD) * WORD;
    let int_at = |bytes: &[u8], at: usize| {
        let mut raw = [0u8; INT];
        raw.copy_from_slice(&bytes[at..at + INT]);
        i32::from_ne_bytes(raw)
    };
    let mut fds = Vec::new();
    let mut at = 0usize;
    while let Some(header) = control.get(at..at.saturating_add(data_at)) {
        let mut word = [0u8; WORD];
        word.copy_from_slice(&header[..WORD]);
        let len = usize::from_ne_bytes(word);
        if len < data_at {
            break;
        }
        let (level, kind) = (int_at(header, WORD), int_at(header, WORD + INT));
        let end = at.saturating_add(len).min(control.len());
        if level == libc::SOL_SOCKET && kind == libc::SCM_RIGHTS {
            for raw in control[at + data_at..end].chunks_exact(INT) {
                let raw_fd = int_at(raw, 0);
                // SAFETY: the kernel just installed `raw_fd` in our fd table for this SCM_RIGHTS message
                // (with O_CLOEXEC) and wrote its number here; nothing else knows about it, so this
                // OwnedFd is its only owner.
                fds.push(unsafe { OwnedFd::from_raw_fd(raw_fd) });
            }
        }
        at = at.saturating_add(len.div_ceil(WORD).saturating_mul(WORD));
    }
    fds
}

fn with_path(e: io::Error, what: &str, path: &Path) -> io::Error {
    io::Error::new(e.kind(), format!("{what} {}: {e}", path.display()))
}
