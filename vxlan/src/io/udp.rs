//! The UDP socket on the data-path port.

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;

use socket2::{Domain, Protocol, Socket, Type};

/// Socket buffer size asked for in each direction.
pub const BUFFER_BYTES: usize = 4 << 20;

/// Binds the data-path socket with large buffers. The kernel caps `SO_RCVBUF`/`SO_SNDBUF` at
/// `net.core.rmem_max`/`wmem_max` (about 200 KiB by default, a few hundred datagrams); a
/// process with `CAP_NET_ADMIN` (the agent runs as root) may go past the caps with the `FORCE`
/// variants, which are tried first.
pub fn bind(addr: SocketAddr) -> io::Result<UdpSocket> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if set_int(&socket, libc::SO_RCVBUFFORCE, BUFFER_BYTES).is_err() {
        socket.set_recv_buffer_size(BUFFER_BYTES)?;
    }
    if set_int(&socket, libc::SO_SNDBUFFORCE, BUFFER_BYTES).is_err() {
        socket.set_send_buffer_size(BUFFER_BYTES)?;
    }
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

fn set_int(socket: &Socket, option: libc::c_int, value: usize) -> io::Result<()> {
    let value = libc::c_int::try_from(value)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "socket option too large"))?;
    // SAFETY: a valid socket; the option value is a live c_int whose size is passed with it.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            option,
            (&value as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
