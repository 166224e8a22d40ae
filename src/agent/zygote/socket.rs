//! The worker's end of the zygote's `SOCK_SEQPACKET` socket: one message per packet, file
//! descriptors attached with `SCM_RIGHTS`, registered with the tokio reactor.

// Registering a raw socket with the reactor is `unsafe` in tokio (the fd must stay open while
// registered): the `OwnedFd` inside the `AsyncFd` is that guarantee.
#![allow(unsafe_code)]

use std::{
    io::{self, IoSlice},
    os::fd::{AsRawFd, OwnedFd, RawFd},
};

use nix::sys::socket::{
    AddressFamily, ControlMessage, MsgFlags, SockFlag, SockType, sendmsg, setsockopt, socketpair,
    sockopt,
};
use tokio::io::unix::AsyncFd;

/// Send buffer asked for: a request up to the protocol's 1 MiB must fit in one packet.
const SEND_BUFFER_BYTES: usize = 2 << 20;
/// Longest packet read (replies are small; a longer one is cut and fails to parse).
const MAX_PACKET_BYTES: usize = 64 * 1024;

/// The worker's end of a socketpair.
pub(super) struct PacketSocket(AsyncFd<OwnedFd>);

impl PacketSocket {
    /// The worker's end (non-blocking, close-on-exec, with a send buffer big enough for a
    /// request) and the zygote's (blocking; the spawn puts it on the zygote's fd 0). Inside a
    /// tokio runtime.
    pub(super) fn pair() -> io::Result<(Self, OwnedFd)> {
        let (ours, theirs) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )?;
        let flags = nix::fcntl::fcntl(&ours, nix::fcntl::F_GETFL)?;
        let flags = nix::fcntl::OFlag::from_bits_retain(flags) | nix::fcntl::OFlag::O_NONBLOCK;
        nix::fcntl::fcntl(&ours, nix::fcntl::F_SETFL(flags))?;
        // Above `net.core.wmem_max` only with CAP_NET_ADMIN; without it the kernel's cap
        // stands, and a request that does not fit is refused (a cold start) with the reason.
        if setsockopt(&ours, sockopt::SndBufForce, &SEND_BUFFER_BYTES).is_err() {
            let _ = setsockopt(&ours, sockopt::SndBuf, &SEND_BUFFER_BYTES);
        }
        // SAFETY: the OwnedFd moves into the AsyncFd, which keeps it open while registered
        // and deregisters it before closing it.
        let registered = unsafe { AsyncFd::register(ours) }?;
        Ok((Self(registered), theirs))
    }

    /// Sends one packet with `fds` attached.
    pub(super) async fn send(&self, packet: &[u8], fds: &[RawFd]) -> io::Result<()> {
        let rights = [ControlMessage::ScmRights(fds)];
        let cmsgs: &[ControlMessage<'_>] = if fds.is_empty() { &[] } else { &rights };
        loop {
            let mut ready = self.0.writable().await?;
            let sent = ready.try_io(|fd| {
                sendmsg::<()>(
                    fd.as_raw_fd(),
                    &[IoSlice::new(packet)],
                    cmsgs,
                    MsgFlags::MSG_NOSIGNAL,
                    None,
                )
                .map_err(io::Error::from)
            });
            if let Ok(sent) = sent {
                return sent.map(|_| ());
            }
        }
    }

    /// Reads one packet; end-of-file (the zygote is gone) is an error.
    pub(super) async fn recv(&self) -> io::Result<Vec<u8>> {
        loop {
            let mut ready = self.0.readable().await?;
            match ready.try_io(|fd| read_packet(fd.as_raw_fd(), MsgFlags::empty())) {
                Ok(Ok(packet)) if packet.is_empty() => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "it closed its socket",
                    ));
                }
                Ok(result) => return result,
                Err(_would_block) => continue,
            }
        }
    }

    /// A packet already waiting, if there is one.
    pub(super) fn try_recv(&self) -> Option<Vec<u8>> {
        read_packet(self.0.as_raw_fd(), MsgFlags::MSG_DONTWAIT)
            .ok()
            .filter(|p| !p.is_empty())
    }
}

fn read_packet(fd: RawFd, flags: MsgFlags) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; MAX_PACKET_BYTES];
    let n = nix::sys::socket::recv(fd, &mut buf, flags)?;
    buf.truncate(n);
    Ok(buf)
}
