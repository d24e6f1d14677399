//! A layer-2 TAP device (no packet-information header) with offloads, through the `tun` crate,
//! plus the settings it does not offer: the offloads themselves, the MAC address and IPv6 off.
//!
//! Every read and write carries a [`VirtioNetHdr`](crate::offload::VirtioNetHdr) before the
//! frame (`IFF_VNET_HDR`), and the kernel may hand over TCP segments of up to 64 KiB with their
//! checksums left to us (`TUNSETOFFLOAD` with `TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6`).

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::time::Duration;

use tun::AbstractDevice;

use crate::wire::Mac;

/// An open TAP device. Dropping it removes the interface.
pub struct Tap {
    dev: tun::Device,
    name: String,
}

impl core::fmt::Debug for Tap {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Tap").field("name", &self.name).finish()
    }
}

/// How to set up a TAP device.
#[derive(Debug, Clone)]
pub struct TapConfig {
    /// Interface name (at most 15 bytes).
    pub name: String,
    /// Its MAC address.
    pub mac: Mac,
    /// Its MTU.
    pub mtu: u16,
    /// Its IPv4 address and prefix length, if any.
    pub address: Option<(Ipv4Addr, u8)>,
    /// Whether its reader takes large segments with checksums left to it (the overlay's
    /// devices), or only whole frames with complete checksums (the mesh device, whose frames
    /// are rewritten one by one).
    pub offload: bool,
}

fn tun_err(e: tun::Error) -> io::Error {
    match e {
        tun::Error::Io(e) => e,
        other => io::Error::other(other.to_string()),
    }
}

impl Tap {
    /// Creates the device, sets its MAC, MTU and address, turns IPv6 off on it (the overlay is
    /// IPv4; this keeps router solicitations and DAD probes off the wire), and brings it up.
    pub fn create(config: &TapConfig) -> io::Result<Tap> {
        let mut cfg = tun::Configuration::default();
        cfg.tun_name(&config.name)
            .layer(tun::Layer::L2)
            .mtu(config.mtu);
        cfg.platform_config(|p| {
            p.vnet_hdr(true);
        });
        let dev = tun::create(&cfg).map_err(tun_err)?;
        let offloads = if config.offload {
            libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6
        } else {
            0
        };
        set_offload(dev.as_raw_fd(), offloads)?;
        let mut tap = Tap {
            dev,
            name: config.name.clone(),
        };
        set_mac(&tap.name, config.mac)?;
        // Best effort: a kernel without IPv6 has no such file, and that is fine too.
        let _ = std::fs::write(
            format!("/proc/sys/net/ipv6/conf/{}/disable_ipv6", tap.name),
            "1",
        );
        if let Some((addr, prefix)) = config.address {
            tap.dev.set_address(addr.into()).map_err(tun_err)?;
            let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
            tap.dev
                .set_netmask(Ipv4Addr::from(mask).into())
                .map_err(tun_err)?;
        }
        tap.dev.enabled(true).map_err(tun_err)?;
        Ok(tap)
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Reads one virtio header and frame, waiting at most `timeout` (`TimedOut` if none came).
    pub fn recv_timeout(&self, buf: &mut [u8], timeout: Duration) -> io::Result<usize> {
        self.dev.recv_timeout(buf, timeout)
    }

    /// Writes one virtio header and frame.
    pub fn send(&self, frame: &[u8]) -> io::Result<usize> {
        self.dev.send(frame)
    }

    /// The device's file descriptor.
    pub fn raw_fd(&self) -> std::os::fd::RawFd {
        self.dev.as_raw_fd()
    }
}

/// Tells the TAP device which offloads its reader handles.
fn set_offload(fd: std::os::fd::RawFd, flags: libc::c_uint) -> io::Result<()> {
    // SAFETY: a valid TAP descriptor; TUNSETOFFLOAD takes its argument by value.
    let rc = unsafe { libc::ioctl(fd, libc::TUNSETOFFLOAD, libc::c_ulong::from(flags)) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Sets an interface's MAC address (SIOCSIFHWADDR), which the `tun` crate does not offer.
fn set_mac(name: &str, mac: Mac) -> io::Result<()> {
    let bytes = name.as_bytes();
    if bytes.len() >= libc::IFNAMSIZ {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "interface name too long",
        ));
    }
    // SAFETY: socket(2) with constant arguments; the result is checked and owned below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh, valid descriptor that nothing else owns.
    let sock = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { core::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    // SAFETY: writing the sockaddr variant of the union, which SIOCSIFHWADDR reads.
    unsafe {
        req.ifr_ifru.ifru_hwaddr.sa_family = libc::ARPHRD_ETHER;
        for (dst, src) in req.ifr_ifru.ifru_hwaddr.sa_data.iter_mut().zip(mac.0) {
            *dst = src as libc::c_char;
        }
    }
    // SAFETY: a valid socket, a request code that takes a *mut ifreq, and a live ifreq.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFHWADDR, &mut req) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
