//! The links that attach containers to a user overlay network on this node, made over netlink
//! (rtnetlink), never by running `ip`.
//!
//! The model is docker's overlay driver, in the node's own namespace: each user network with
//! containers on this node has a Linux bridge ([`Links::ensure_bridge`]) whose ports are the
//! network's TAP device ([`Links::set_master`]) and one veth pair per container
//! ([`Links::attach`]). The host end of the pair is a bridge port; the other end lives in the
//! container's network namespace, renamed to the interface name the runtime asked for, with
//! the container's MAC, MTU, IPv4 address and default route. [`Links::check`] is CNI's CHECK
//! and [`Links::delete`] undoes either (deleting one end of a veth pair deletes the other).
//!
//! Work inside a container's namespace runs on a thread of its own that enters the namespace
//! (`setns`), with its own single-threaded tokio runtime and netlink socket: the agent's own
//! threads never change namespace.
//!
//! What it does not do: create the TAP device, choose names, MACs or addresses (callers do),
//! IPv6, or anything in the container beyond its one interface, its loopback and its default
//! route. Everything but name validation needs `CAP_NET_ADMIN` (and `CAP_SYS_ADMIN` to enter
//! a container's namespace).

use std::fmt;
use std::fs::File;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use futures_util::TryStreamExt;
use ipnet::Ipv4Net;
use nix::errno::Errno;
use nix::sched::{setns, CloneFlags};
use rtnetlink::packet_route::address::{AddressAttribute, AddressMessage};
use rtnetlink::packet_route::link::{
    InfoData, InfoKind, InfoVeth, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};
use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute, RouteMessage};
use rtnetlink::{Handle, LinkBridge, LinkUnspec, LinkVeth, RouteMessageBuilder};
use tracing::warn;

/// The longest interface name Linux accepts, in bytes (`IFNAMSIZ` less its NUL).
pub const MAX_NAME_LEN: usize = 15;

/// The main routing table (`RT_TABLE_MAIN`), where the default route goes.
const MAIN_TABLE: u32 = 254;

/// Which network namespace an interface is in, for error messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Namespace {
    /// The agent's own namespace: the node's.
    Node,
    /// A container's, by the path its runtime gave.
    Container(PathBuf),
}

impl fmt::Display for Namespace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Namespace::Node => f.write_str("on the node"),
            Namespace::Container(path) => write!(f, "in network namespace {}", path.display()),
        }
    }
}

/// One way an attachment differs from what [`Links::check`] was asked to find.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Difference {
    /// What differs: `"master"`, `"state"`, `"MAC"`, `"MTU"`, `"address"` or `"default route"`.
    pub what: &'static str,
    /// What the attachment should have.
    pub expected: String,
    /// What the interface has.
    pub found: String,
}

impl fmt::Display for Difference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} is {}, expected {}",
            self.what, self.found, self.expected
        )
    }
}

/// Why a link operation failed. Unless a variant says otherwise, what the operation had made
/// before it failed is removed again ([`Links::attach`] leaves no half-made pair).
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// A name the caller gave is not one Linux accepts; nothing was touched.
    #[error(
        "{name:?} is not a valid interface name: {reason}; use 1 to {MAX_NAME_LEN} bytes \
         without `/`, `:` or whitespace"
    )]
    InvalidName {
        /// The name.
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The gateway is outside the container's subnet, so no route could reach it; nothing was
    /// touched.
    #[error("gateway {gateway} is not in the container's subnet {address}; fix the IPAM reply")]
    GatewayOutsideSubnet {
        /// The gateway asked for.
        gateway: Ipv4Addr,
        /// The container's address and prefix.
        address: Ipv4Net,
    },
    /// The container's network namespace cannot be opened or entered: the path does not exist
    /// (the container is gone) or is not a network namespace. CNI runtimes report this as
    /// error code 3, "container unknown".
    #[error(
        "cannot use network namespace {}: {reason}; is the container still running, and is \
         the path its network namespace?",
        path.display()
    )]
    NoNetns {
        /// The path the caller gave.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// An interface name is already in use where the operation wanted to create it; nothing
    /// was changed.
    #[error("interface {name} already exists {ns}; delete it first or choose another name")]
    Exists {
        /// The name.
        name: String,
        /// Where.
        ns: Namespace,
    },
    /// An interface the operation needs does not exist.
    #[error("no interface {name} {ns}; create it first (or check the name)")]
    NotFound {
        /// The name.
        name: String,
        /// Where it was looked for.
        ns: Namespace,
    },
    /// An interface exists but is of another kind than the operation needs (a bridge).
    #[error("interface {name} {ns} is {kind}, not a {expected}; delete it or choose another name")]
    WrongKind {
        /// The name.
        name: String,
        /// Where.
        ns: Namespace,
        /// Its kind (`veth`, `dummy`, ... or `a device without a kind`).
        kind: String,
        /// The kind needed.
        expected: &'static str,
    },
    /// [`Links::check`]: an interface is not as the attachment says; nothing was changed.
    #[error("interface {name} {ns} does not match the attachment: {}", list(.differences))]
    Mismatch {
        /// The interface.
        name: String,
        /// Where.
        ns: Namespace,
        /// Every way it differs.
        differences: Vec<Difference>,
    },
    /// The kernel refused a netlink request.
    #[error("cannot {doing} {ns}: {source}")]
    Netlink {
        /// What was being done.
        doing: String,
        /// Where.
        ns: Namespace,
        /// The netlink error (its errno says why).
        source: rtnetlink::Error,
    },
    /// A netlink socket, a thread or a runtime could not be made.
    #[error("cannot {doing}: {source}; is the agent short of file descriptors or memory?")]
    Io {
        /// What was being done.
        doing: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
    /// The thread working in a container's namespace ended without an answer (it panicked).
    #[error(
        "the thread working in network namespace {} ended without an answer; this is a bug, \
         see the agent's log",
        .0.display()
    )]
    Worker(PathBuf),
}

fn list(differences: &[Difference]) -> String {
    let all: Vec<String> = differences.iter().map(ToString::to_string).collect();
    all.join("; ")
}

impl LinkError {
    /// The errno of a refused netlink request, if this is one.
    pub fn errno(&self) -> Option<Errno> {
        match self {
            LinkError::Netlink { source, .. } => errno(source),
            _ => None,
        }
    }
}

/// Checks that `name` is an interface name Linux accepts: 1 to [`MAX_NAME_LEN`] bytes, not
/// `.` or `..`, without `/`, `:` (the kernel's alias separator), whitespace or NUL.
pub fn validate_name(name: &str) -> Result<(), LinkError> {
    let reason = if name.is_empty() {
        "it is empty"
    } else if name.len() > MAX_NAME_LEN {
        "it is longer than 15 bytes"
    } else if name == "." || name == ".." {
        "`.` and `..` are reserved"
    } else if name.contains('/') {
        "it contains `/`"
    } else if name.contains(':') {
        "it contains `:`"
    } else if name.chars().any(char::is_whitespace) {
        "it contains whitespace"
    } else if name.contains('\0') {
        "it contains a NUL byte"
    } else {
        return Ok(());
    };
    Err(LinkError::InvalidName {
        name: name.to_owned(),
        reason,
    })
}

/// One container's attachment to a user network: what [`Links::attach`] makes and
/// [`Links::check`] checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attach {
    /// The network's bridge on this node (made by [`Links::ensure_bridge`]), e.g. `shb-1001`.
    pub bridge: String,
    /// The host end of the veth pair, a port of the bridge, e.g. `shv3fa9c2e1`.
    pub host_ifname: String,
    /// The container's network namespace, e.g. `/var/run/netns/foo` or `/proc/PID/ns/net`.
    pub netns: PathBuf,
    /// The interface name inside the container, e.g. `eth0`.
    pub ifname: String,
    /// The container interface's MAC address.
    pub mac: [u8; 6],
    /// The container's IPv4 address and the network's prefix length.
    pub address: Ipv4Net,
    /// The default route's gateway, in `address`'s subnet; `None` adds no default route.
    pub gateway: Option<Ipv4Addr>,
    /// The MTU of both ends of the veth pair.
    pub mtu: u32,
}

impl Attach {
    fn validate(&self) -> Result<(), LinkError> {
        validate_name(&self.bridge)?;
        validate_name(&self.host_ifname)?;
        validate_name(&self.ifname)?;
        match self.gateway {
            Some(gateway) if !self.address.contains(&gateway) => {
                Err(LinkError::GatewayOutsideSubnet {
                    gateway,
                    address: self.address,
                })
            }
            _ => Ok(()),
        }
    }

    fn container(&self) -> Namespace {
        Namespace::Container(self.netns.clone())
    }
}

/// A netlink connection in the agent's own (the node's) network namespace, and the
/// operations on it. See the module docs.
#[derive(Debug, Clone)]
pub struct Links {
    handle: Handle,
}

impl Links {
    /// Opens a netlink connection in the calling thread's network namespace; its driver runs
    /// as a task on the current tokio runtime.
    pub async fn new() -> Result<Links, LinkError> {
        Ok(Links { handle: connect()? })
    }

    /// Makes bridge `name` unless it exists, sets its MTU to `mtu` and brings it up; its
    /// interface index. An existing bridge is kept (with its ports); an existing interface
    /// of another kind is [`LinkError::WrongKind`].
    pub async fn ensure_bridge(&self, name: &str, mtu: u32) -> Result<u32, LinkError> {
        validate_name(name)?;
        let ns = Namespace::Node;
        if get_link(&self.handle, name, &ns).await?.is_none() {
            let made = self
                .handle
                .link()
                .add(LinkBridge::new(name).build())
                .execute()
                .await;
            match made {
                // Made by someone else meanwhile: checked and kept below like any other.
                Err(e) if errno(&e) == Some(Errno::EEXIST) => {}
                Err(source) => return Err(netlink(format!("create bridge {name}"), &ns, source)),
                Ok(()) => {}
            }
        }
        let index = bridge_index(&self.handle, name, &ns).await?;
        // The overlay is IPv4: no router solicitations or MLD reports from the bridge itself
        // (best effort, as for the TAP: a kernel without IPv6 has no such file).
        let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6"), "1");
        // Set on the existing device, so the bridge keeps this MTU as set by hand instead of
        // following its ports' smallest.
        self.handle
            .link()
            .change(LinkUnspec::new_with_index(index).mtu(mtu).up().build())
            .execute()
            .await
            .map_err(|e| netlink(format!("set bridge {name} up with MTU {mtu}"), &ns, e))?;
        Ok(index)
    }

    /// Makes `port` (the network's TAP device, say) a port of bridge `bridge` and brings it
    /// up.
    pub async fn set_master(&self, port: &str, bridge: &str) -> Result<(), LinkError> {
        validate_name(port)?;
        validate_name(bridge)?;
        let ns = Namespace::Node;
        let master = bridge_index(&self.handle, bridge, &ns).await?;
        let index = link_index(&self.handle, port, &ns).await?;
        self.handle
            .link()
            .change(
                LinkUnspec::new_with_index(index)
                    .controller(master)
                    .up()
                    .build(),
            )
            .execute()
            .await
            .map_err(|e| netlink(format!("make {port} a port of {bridge} and up"), &ns, e))
    }

    /// Deletes interface `name` in the node's namespace (a veth's peer, wherever it is, goes
    /// with it); whether it existed. An absent interface is `Ok(false)`.
    pub async fn delete(&self, name: &str) -> Result<bool, LinkError> {
        validate_name(name)?;
        let ns = Namespace::Node;
        let Some(link) = get_link(&self.handle, name, &ns).await? else {
            return Ok(false);
        };
        match self.handle.link().del(link.header.index).execute().await {
            Ok(()) => Ok(true),
            // Deleted by someone else meanwhile.
            Err(e) if errno(&e) == Some(Errno::ENODEV) => Ok(false),
            Err(source) => Err(netlink(format!("delete {name}"), &ns, source)),
        }
    }

    /// Whether interface `name` exists in the node's namespace.
    pub async fn exists(&self, name: &str) -> Result<bool, LinkError> {
        validate_name(name)?;
        Ok(get_link(&self.handle, name, &Namespace::Node)
            .await?
            .is_some())
    }

    /// Attaches a container: makes the veth pair `a.host_ifname` (a port of `a.bridge`, up) /
    /// `a.ifname` (in `a.netns`, with `a.mac`, `a.mtu` and `a.address`, up, with a default
    /// route via `a.gateway` if there is one) and brings the container's loopback up.
    ///
    /// Fails with [`LinkError::Exists`] if either name is taken (the host name on the node,
    /// the interface name in the container), with [`LinkError::NoNetns`] if the namespace
    /// cannot be entered, both before anything is made. On any later failure the pair it made
    /// is deleted again.
    pub async fn attach(&self, a: &Attach) -> Result<(), LinkError> {
        a.validate()?;
        let netns = open_netns(&a.netns)?;
        let node = Namespace::Node;
        // Enter the namespace before making anything: it must be one, and the name free there.
        let ifname = a.ifname.clone();
        in_netns(&netns, &a.netns, move |handle, ns| async move {
            match get_link(&handle, &ifname, &ns).await? {
                Some(_) => Err(LinkError::Exists { name: ifname, ns }),
                None => Ok(()),
            }
        })
        .await?;
        let bridge = bridge_index(&self.handle, &a.bridge, &node).await?;
        if get_link(&self.handle, &a.host_ifname, &node)
            .await?
            .is_some()
        {
            return Err(LinkError::Exists {
                name: a.host_ifname.clone(),
                ns: node,
            });
        }

        // One request makes both ends: the peer straight in the container's namespace with its
        // final name, MAC and MTU; the host end on the bridge and up. The kernel makes all of
        // it or nothing.
        let peer = LinkUnspec::new_with_name(&a.ifname)
            .address(a.mac.to_vec())
            .mtu(a.mtu)
            .setns_by_fd(netns.as_raw_fd())
            .build();
        let pair = LinkVeth::new(&a.host_ifname, &a.ifname)
            .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
            .mtu(a.mtu)
            .controller(bridge)
            .up()
            .build();
        if let Err(source) = self.handle.link().add(pair).execute().await {
            if errno(&source) == Some(Errno::EEXIST) {
                // Taken since the checks above: say which name, if it can be told.
                let name = if self.exists(&a.host_ifname).await.unwrap_or(false) {
                    (a.host_ifname.clone(), node)
                } else {
                    (a.ifname.clone(), a.container())
                };
                return Err(LinkError::Exists {
                    name: name.0,
                    ns: name.1,
                });
            }
            let doing = format!(
                "create veth pair {} (port of {}) / {} ({})",
                a.host_ifname,
                a.bridge,
                a.ifname,
                a.container()
            );
            return Err(netlink(doing, &node, source));
        }

        let inside = a.clone();
        let configured = in_netns(&netns, &a.netns, move |handle, ns| async move {
            configure_container(&handle, &inside, &ns).await
        })
        .await;
        if let Err(e) = configured {
            match self.delete(&a.host_ifname).await {
                Ok(_) => {}
                Err(undo) => warn!(
                    host_ifname = %a.host_ifname,
                    error = %undo,
                    "could not delete the veth pair of a failed attach"
                ),
            }
            return Err(e);
        }
        Ok(())
    }

    /// CNI CHECK: the host end exists, is a port of the bridge and up; inside the namespace
    /// the interface exists, is up, and has the MAC, MTU and address, and the default route
    /// via the gateway if there is one. [`LinkError::Mismatch`] lists every difference.
    pub async fn check(&self, a: &Attach) -> Result<(), LinkError> {
        a.validate()?;
        let netns = open_netns(&a.netns)?;
        let node = Namespace::Node;
        let bridge = bridge_index(&self.handle, &a.bridge, &node).await?;
        let host = get_link(&self.handle, &a.host_ifname, &node)
            .await?
            .ok_or_else(|| LinkError::NotFound {
                name: a.host_ifname.clone(),
                ns: node.clone(),
            })?;
        let mut differences = Vec::new();
        let master = controller(&host);
        if master != Some(bridge) {
            let found = match master {
                None => "none".to_owned(),
                Some(index) => link_name(&self.handle, index, &node)
                    .await?
                    .unwrap_or_else(|| format!("interface {index}")),
            };
            differences.push(Difference {
                what: "master",
                expected: a.bridge.clone(),
                found,
            });
        }
        if !is_up(&host) {
            differences.push(state_difference());
        }
        if !differences.is_empty() {
            return Err(LinkError::Mismatch {
                name: a.host_ifname.clone(),
                ns: node,
                differences,
            });
        }

        let inside = a.clone();
        in_netns(&netns, &a.netns, move |handle, ns| async move {
            check_container(&handle, &inside, &ns).await
        })
        .await
    }
}

/// Inside the container's namespace, after the pair is made: the interface up, its address,
/// the default route, loopback up.
async fn configure_container(h: &Handle, a: &Attach, ns: &Namespace) -> Result<(), LinkError> {
    let index = link_index(h, &a.ifname, ns).await?;
    h.link()
        .change(LinkUnspec::new_with_index(index).up().build())
        .execute()
        .await
        .map_err(|e| netlink(format!("bring {} up", a.ifname), ns, e))?;
    h.address()
        .add(index, IpAddr::V4(a.address.addr()), a.address.prefix_len())
        .execute()
        .await
        .map_err(|e| netlink(format!("add address {} to {}", a.address, a.ifname), ns, e))?;
    if let Some(gateway) = a.gateway {
        let route = RouteMessageBuilder::<Ipv4Addr>::new()
            .gateway(gateway)
            .output_interface(index)
            .build();
        h.route().add(route).execute().await.map_err(|e| {
            let doing = format!("add the default route via {gateway} dev {}", a.ifname);
            netlink(doing, ns, e)
        })?;
    }
    // Last, so that after an earlier failure the namespace is as it was once the pair is gone.
    if let Some(lo) = get_link(h, "lo", ns).await? {
        h.link()
            .change(LinkUnspec::new_with_index(lo.header.index).up().build())
            .execute()
            .await
            .map_err(|e| netlink("bring lo up".to_owned(), ns, e))?;
    }
    Ok(())
}

/// The tc priority of shoal's filters (`tc filter show dev DEV ingress` shows `pref 21320`):
/// one band on the underlay device's ingress, all of it shoal's, rebuilt whole on each change.
pub const STEER_PRIORITY: u16 = 0x5348;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_ALL: u16 = 0x0003;

/// A published port to steer: protocol (6 or 17), the node's address, the port.
pub type SteerRule = (u8, Ipv4Addr, u16);

impl Links {
    /// Steers the packets of `rules` arriving on `underlay` to the mesh device `mesh`, and
    /// every frame the data path writes to `mesh` out of `underlay` (see `docs/services.md`):
    /// `u32` filters with `mirred` redirects on the two devices' ingress, in shoal's band
    /// ([`STEER_PRIORITY`]) only; other filters on the devices are left alone. Rules no longer
    /// given are removed; with none, the band is empty.
    pub async fn set_steering(
        &self,
        underlay: &str,
        mesh: &str,
        rules: &[SteerRule],
    ) -> Result<(), LinkError> {
        let ns = Namespace::Node;
        let h = &self.handle;
        let u = link_index(h, underlay, &ns).await?;
        ensure_ingress_qdisc(h, u, &ns).await?;
        delete_band(h, u, &ns).await?;
        // With nothing to steer, a mesh device already gone (the data path stopped) is fine.
        let m = match get_link(h, mesh, &ns).await? {
            Some(l) => l.header.index,
            None if rules.is_empty() => return Ok(()),
            None => {
                return Err(LinkError::NotFound {
                    name: mesh.to_owned(),
                    ns,
                })
            }
        };
        ensure_ingress_qdisc(h, m, &ns).await?;
        delete_band(h, m, &ns).await?;
        for &(proto, addr, port) in rules {
            let keys = [
                u32_key(u32::from(addr), u32::MAX, 16),
                u32_key(u32::from(proto) << 16, 0x00ff_0000, 8),
                // The destination port, for an IPv4 header without options (as tc's own
                // `match ip dport` does).
                u32_key(u32::from(port), 0x0000_ffff, 20),
            ];
            add_redirect(h, u, ETH_P_IP, &keys, m, &ns)
                .await
                .map_err(|e| netlink(format!("steer {addr}:{port} to {mesh}"), &ns, e))?;
        }
        if !rules.is_empty() {
            add_redirect(h, m, ETH_P_ALL, &[u32_key(0, 0, 0)], u, &ns)
                .await
                .map_err(|e| netlink(format!("send {mesh}'s frames out of {underlay}"), &ns, e))?;
        }
        Ok(())
    }
}

impl Links {
    /// Whether the namespace at `netns` has an IPv4 default route (a container joined to
    /// another network already, say).
    pub async fn has_default_route(&self, netns: &Path) -> Result<bool, LinkError> {
        let file = open_netns(netns)?;
        in_netns(&file, netns, |h, ns| async move {
            Ok(!default_routes(&h, &ns).await?.is_empty())
        })
        .await
    }

    /// Makes the /32 addresses on the loopback of the namespace at `netns` exactly `vips` (a
    /// backend holds its services' virtual IPs, for direct return; 127/8 is left alone), and
    /// has its interface `ifname` answer ARP only for its own addresses, so a VIP is never
    /// claimed on the network (`arp_ignore=1`, `arp_announce=2`).
    pub async fn set_loopback_vips(
        &self,
        netns: &Path,
        ifname: &str,
        vips: &[Ipv4Addr],
    ) -> Result<(), LinkError> {
        validate_name(ifname)?;
        let file = open_netns(netns)?;
        let (ifname, vips) = (ifname.to_owned(), vips.to_vec());
        in_netns(&file, netns, move |h, ns| async move {
            for (knob, value) in [("arp_ignore", "1"), ("arp_announce", "2")] {
                // This thread is in the container's namespace: /proc/sys/net is its.
                let path = format!("/proc/sys/net/ipv4/conf/{ifname}/{knob}");
                std::fs::write(&path, value).map_err(|source| LinkError::Io {
                    doing: "set the container interface's ARP behaviour",
                    source,
                })?;
            }
            let lo = link_index(&h, "lo", &ns).await?;
            let held = ipv4_addresses(&h, lo, &ns).await?;
            for net in &held {
                let ip = net.addr();
                if net.prefix_len() == 32 && !ip.is_loopback() && !vips.contains(&ip) {
                    let messages: Vec<AddressMessage> = h
                        .address()
                        .get()
                        .set_link_index_filter(lo)
                        .set_address_filter(IpAddr::V4(ip))
                        .execute()
                        .try_collect()
                        .await
                        .map_err(|e| netlink(format!("look up {ip} on lo"), &ns, e))?;
                    for m in messages {
                        h.address()
                            .del(m)
                            .execute()
                            .await
                            .map_err(|e| netlink(format!("remove {ip} from lo"), &ns, e))?;
                    }
                }
            }
            for vip in &vips {
                if !held.iter().any(|n| n.addr() == *vip) {
                    h.address()
                        .add(lo, IpAddr::V4(*vip), 32)
                        .execute()
                        .await
                        .map_err(|e| netlink(format!("add {vip}/32 to lo"), &ns, e))?;
                }
            }
            Ok(())
        })
        .await
    }

    /// The interface of this namespace that holds `ip`, if one does.
    pub async fn interface_with(&self, ip: Ipv4Addr) -> Result<Option<String>, LinkError> {
        let ns = Namespace::Node;
        let messages: Vec<AddressMessage> = self
            .handle
            .address()
            .get()
            .set_address_filter(IpAddr::V4(ip))
            .execute()
            .try_collect()
            .await
            .map_err(|e| netlink(format!("look up the interface with {ip}"), &ns, e))?;
        match messages.first() {
            Some(m) => link_name(&self.handle, m.header.index, &ns).await,
            None => Ok(None),
        }
    }
}

/// Whether a TCP connection to `addr` can be made from inside the network namespace at
/// `netns` within `timeout` (a backend's health check, made where the backend is). On a
/// thread of its own, which enters the namespace and ends with the check.
pub async fn connects_in(netns: &Path, addr: std::net::SocketAddr, timeout: Duration) -> bool {
    let Ok(file) = File::open(netns) else {
        return false;
    };
    let (tx, rx) = tokio::sync::oneshot::channel();
    let spawned = std::thread::Builder::new()
        .name("shoal-health".to_owned())
        .spawn(move || {
            let ok = setns(&file, CloneFlags::CLONE_NEWNET).is_ok()
                && std::net::TcpStream::connect_timeout(&addr, timeout).is_ok();
            let _ = tx.send(ok);
        });
    spawned.is_ok() && rx.await.unwrap_or(false)
}

fn u32_key(val: u32, mask: u32, off: i32) -> rtnetlink::packet_route::tc::TcU32Key {
    let mut k = rtnetlink::packet_route::tc::TcU32Key::default();
    k.val = val & mask;
    k.mask = mask;
    k.off = off;
    k
}

/// Adds the `ingress` qdisc to interface `index` unless it has one.
async fn ensure_ingress_qdisc(h: &Handle, index: u32, ns: &Namespace) -> Result<(), LinkError> {
    let index_i32 = i32::try_from(index).unwrap_or(i32::MAX);
    match h.qdisc().add(index_i32).ingress().execute().await {
        Ok(()) => Ok(()),
        Err(e) if errno(&e) == Some(Errno::EEXIST) => Ok(()),
        Err(e) => Err(netlink(
            format!("add the ingress qdisc to interface {index}"),
            ns,
            e,
        )),
    }
}

/// Deletes every filter in shoal's band on interface `index`'s ingress.
async fn delete_band(h: &Handle, index: u32, ns: &Namespace) -> Result<(), LinkError> {
    use futures_util::StreamExt;
    use rtnetlink::packet_core::{NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_REQUEST};
    use rtnetlink::packet_route::tc::{TcHandle, TcMessage};
    use rtnetlink::packet_route::RouteNetlinkMessage;
    // Protocol 0: the band whatever its protocol (naming another protocol than the band's
    // is EINVAL).
    {
        let mut msg = TcMessage::with_index(i32::try_from(index).unwrap_or(i32::MAX));
        msg.header.parent = TcHandle {
            major: 0xffff,
            minor: TcHandle::MIN_INGRESS,
        };
        msg.header.info = u32::from(TcHandle {
            major: STEER_PRIORITY,
            minor: 0,
        });
        let mut req = NetlinkMessage::from(RouteNetlinkMessage::DelTrafficFilter(msg));
        req.header.flags = NLM_F_REQUEST | NLM_F_ACK;
        let mut handle = h.clone();
        let mut answers = handle
            .request(req)
            .map_err(|e| netlink(format!("clear shoal's filters on interface {index}"), ns, e))?;
        while let Some(answer) = answers.next().await {
            if let NetlinkPayload::Error(e) = answer.payload {
                let code = e.raw_code();
                // None there: nothing to delete.
                if code != 0 && Errno::from_raw(code.abs()) != Errno::ENOENT {
                    return Err(netlink(
                        format!("clear shoal's filters on interface {index}"),
                        ns,
                        rtnetlink::Error::NetlinkError(e),
                    ));
                }
            }
        }
    }
    Ok(())
}

/// Adds a filter in shoal's band on `index`'s ingress: frames of `proto` matching `keys` are
/// redirected to the egress of interface `to`.
async fn add_redirect(
    h: &Handle,
    index: u32,
    proto: u16,
    keys: &[rtnetlink::packet_route::tc::TcU32Key],
    to: u32,
    _ns: &Namespace,
) -> Result<(), rtnetlink::Error> {
    use rtnetlink::packet_route::tc::{
        TcAction, TcActionAttribute, TcActionGeneric, TcActionMirror, TcActionMirrorOption,
        TcActionOption, TcActionType, TcFilterU32Option, TcMirror, TcMirrorActionType,
        TcU32Selector, TcU32SelectorFlags,
    };
    let mut sel = TcU32Selector::default();
    sel.flags = TcU32SelectorFlags::Terminal;
    sel.nkeys = u8::try_from(keys.len()).unwrap_or(u8::MAX);
    sel.keys = keys.to_vec();
    let mut mirror = TcMirror::default();
    mirror.generic = TcActionGeneric::default();
    mirror.generic.action = TcActionType::Stolen;
    mirror.eaction = TcMirrorActionType::EgressRedir;
    mirror.ifindex = to;
    let mut action = TcAction::default();
    action.attributes = vec![
        TcActionAttribute::Kind(TcActionMirror::KIND.to_string()),
        TcActionAttribute::Options(vec![TcActionOption::Mirror(TcActionMirrorOption::Parms(
            mirror,
        ))]),
    ];
    h.traffic_filter(i32::try_from(index).unwrap_or(i32::MAX))
        .add()
        .ingress()
        .priority(STEER_PRIORITY)
        .protocol(proto.to_be())
        .u32(&[
            TcFilterU32Option::Selector(sel),
            TcFilterU32Option::Action(vec![action]),
        ])?
        .execute()
        .await
}

/// [`Links::check`] inside the container's namespace.
async fn check_container(h: &Handle, a: &Attach, ns: &Namespace) -> Result<(), LinkError> {
    let link = get_link(h, &a.ifname, ns)
        .await?
        .ok_or_else(|| LinkError::NotFound {
            name: a.ifname.clone(),
            ns: ns.clone(),
        })?;
    let index = link.header.index;
    let mut differences = Vec::new();
    if !is_up(&link) {
        differences.push(state_difference());
    }
    let found_mac = link_mac(&link);
    if found_mac != Some(&a.mac[..]) {
        differences.push(Difference {
            what: "MAC",
            expected: mac_text(&a.mac),
            found: found_mac.map_or_else(|| "none".to_owned(), mac_text),
        });
    }
    let found_mtu = link_mtu(&link);
    if found_mtu != Some(a.mtu) {
        differences.push(Difference {
            what: "MTU",
            expected: a.mtu.to_string(),
            found: found_mtu.map_or_else(|| "none".to_owned(), |m| m.to_string()),
        });
    }
    let addresses = ipv4_addresses(h, index, ns).await?;
    if !addresses.contains(&a.address) {
        differences.push(Difference {
            what: "address",
            expected: a.address.to_string(),
            found: if addresses.is_empty() {
                "none".to_owned()
            } else {
                let all: Vec<String> = addresses.iter().map(ToString::to_string).collect();
                all.join(", ")
            },
        });
    }
    if let Some(gateway) = a.gateway {
        let routes = default_routes(h, ns).await?;
        if !routes.contains(&(gateway, index)) {
            differences.push(Difference {
                what: "default route",
                expected: format!("via {gateway} dev {}", a.ifname),
                found: if routes.is_empty() {
                    "none".to_owned()
                } else {
                    let all: Vec<String> = routes
                        .iter()
                        .map(|(gw, oif)| format!("via {gw} dev index {oif}"))
                        .collect();
                    all.join(", ")
                },
            });
        }
    }
    if differences.is_empty() {
        Ok(())
    } else {
        Err(LinkError::Mismatch {
            name: a.ifname.clone(),
            ns: ns.clone(),
            differences,
        })
    }
}

fn state_difference() -> Difference {
    Difference {
        what: "state",
        expected: "up".to_owned(),
        found: "down".to_owned(),
    }
}

/// A netlink connection in the calling thread's namespace, its driver spawned on the current
/// runtime.
fn connect() -> Result<Handle, LinkError> {
    let (connection, handle, _) = rtnetlink::new_connection().map_err(|source| LinkError::Io {
        doing: "open a netlink socket",
        source,
    })?;
    tokio::spawn(connection);
    Ok(handle)
}

/// Opens the namespace file at `path`.
fn open_netns(path: &Path) -> Result<File, LinkError> {
    File::open(path).map_err(|e| LinkError::NoNetns {
        path: path.to_owned(),
        reason: format!("cannot open it: {e}"),
    })
}

/// Runs `work` in the network namespace `netns` (opened from `path`): on a new thread that
/// enters it, with a single-threaded runtime and a netlink connection of its own, handed to
/// `work`. The calling thread stays where it is.
async fn in_netns<T, F, Fut>(netns: &File, path: &Path, work: F) -> Result<T, LinkError>
where
    T: Send + 'static,
    F: FnOnce(Handle, Namespace) -> Fut + Send + 'static,
    Fut: Future<Output = Result<T, LinkError>>,
{
    let netns = netns.try_clone().map_err(|source| LinkError::Io {
        doing: "duplicate a namespace file descriptor",
        source,
    })?;
    let path = path.to_owned();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let thread_path = path.clone();
    std::thread::Builder::new()
        .name("shoal-netns".to_owned())
        .spawn(move || {
            // The receiver gone means the caller gave up: nobody to tell.
            let _ = tx.send(run_in(netns, thread_path, work));
        })
        .map_err(|source| LinkError::Io {
            doing: "start a thread for a container's namespace",
            source,
        })?;
    rx.await.map_err(|_| LinkError::Worker(path))?
}

/// The body of [`in_netns`]'s thread.
fn run_in<T, F, Fut>(netns: File, path: PathBuf, work: F) -> Result<T, LinkError>
where
    F: FnOnce(Handle, Namespace) -> Fut,
    Fut: Future<Output = Result<T, LinkError>>,
{
    setns(&netns, CloneFlags::CLONE_NEWNET).map_err(|e| LinkError::NoNetns {
        path: path.clone(),
        reason: match e {
            Errno::EINVAL => "it is not a network namespace".to_owned(),
            e => format!("cannot enter it: {e}"),
        },
    })?;
    drop(netns);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .map_err(|source| LinkError::Io {
            doing: "start a runtime in a container's namespace",
            source,
        })?;
    // The socket is made after `setns`, so it belongs to the container's namespace.
    runtime.block_on(async move { work(connect()?, Namespace::Container(path)).await })
}

fn netlink(doing: String, ns: &Namespace, source: rtnetlink::Error) -> LinkError {
    LinkError::Netlink {
        doing,
        ns: ns.clone(),
        source,
    }
}

fn errno(e: &rtnetlink::Error) -> Option<Errno> {
    match e {
        rtnetlink::Error::NetlinkError(m) if m.raw_code() != 0 => {
            Some(Errno::from_raw(m.raw_code().abs()))
        }
        _ => None,
    }
}

/// The link called `name`, if there is one.
async fn get_link(
    h: &Handle,
    name: &str,
    ns: &Namespace,
) -> Result<Option<LinkMessage>, LinkError> {
    match h.link().get().match_name(name).execute().try_next().await {
        Ok(found) => Ok(found),
        Err(e) if errno(&e) == Some(Errno::ENODEV) => Ok(None),
        Err(source) => Err(netlink(format!("look up interface {name}"), ns, source)),
    }
}

/// The name of the link with index `index`, if there is one.
async fn link_name(h: &Handle, index: u32, ns: &Namespace) -> Result<Option<String>, LinkError> {
    match h.link().get().match_index(index).execute().try_next().await {
        Ok(found) => Ok(found.and_then(|l| {
            l.attributes.into_iter().find_map(|a| match a {
                LinkAttribute::IfName(name) => Some(name),
                _ => None,
            })
        })),
        Err(e) if errno(&e) == Some(Errno::ENODEV) => Ok(None),
        Err(source) => Err(netlink(format!("look up interface {index}"), ns, source)),
    }
}

/// The index of link `name`, which must exist.
async fn link_index(h: &Handle, name: &str, ns: &Namespace) -> Result<u32, LinkError> {
    get_link(h, name, ns)
        .await?
        .map(|l| l.header.index)
        .ok_or_else(|| LinkError::NotFound {
            name: name.to_owned(),
            ns: ns.clone(),
        })
}

/// The index of bridge `name`, which must exist and be a bridge.
async fn bridge_index(h: &Handle, name: &str, ns: &Namespace) -> Result<u32, LinkError> {
    let link = get_link(h, name, ns)
        .await?
        .ok_or_else(|| LinkError::NotFound {
            name: name.to_owned(),
            ns: ns.clone(),
        })?;
    match link_kind(&link) {
        Some(InfoKind::Bridge) => Ok(link.header.index),
        other => Err(LinkError::WrongKind {
            name: name.to_owned(),
            ns: ns.clone(),
            kind: other.map_or_else(
                || "a device without a kind".to_owned(),
                |k| format!("a {k}"),
            ),
            expected: "bridge",
        }),
    }
}

fn link_kind(link: &LinkMessage) -> Option<&InfoKind> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::LinkInfo(infos) => infos.iter().find_map(|i| match i {
            LinkInfo::Kind(kind) => Some(kind),
            _ => None,
        }),
        _ => None,
    })
}

fn controller(link: &LinkMessage) -> Option<u32> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::Controller(index) => Some(*index),
        _ => None,
    })
}

fn link_mac(link: &LinkMessage) -> Option<&[u8]> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::Address(mac) => Some(mac.as_slice()),
        _ => None,
    })
}

fn link_mtu(link: &LinkMessage) -> Option<u32> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::Mtu(mtu) => Some(*mtu),
        _ => None,
    })
}

fn is_up(link: &LinkMessage) -> bool {
    link.header.flags.contains(LinkFlags::Up)
}

fn mac_text(mac: &[u8]) -> String {
    let bytes: Vec<String> = mac.iter().map(|b| format!("{b:02x}")).collect();
    bytes.join(":")
}

/// The IPv4 addresses (with prefix) on link `index`.
async fn ipv4_addresses(h: &Handle, index: u32, ns: &Namespace) -> Result<Vec<Ipv4Net>, LinkError> {
    let messages: Vec<AddressMessage> = h
        .address()
        .get()
        .set_link_index_filter(index)
        .execute()
        .try_collect()
        .await
        .map_err(|e| netlink(format!("list the addresses of interface {index}"), ns, e))?;
    Ok(messages
        .iter()
        .filter(|m| m.header.index == index)
        .filter_map(|m| {
            let local = m.attributes.iter().find_map(|a| match a {
                AddressAttribute::Local(IpAddr::V4(ip)) => Some(*ip),
                _ => None,
            });
            let address = m.attributes.iter().find_map(|a| match a {
                AddressAttribute::Address(IpAddr::V4(ip)) => Some(*ip),
                _ => None,
            });
            Ipv4Net::new(local.or(address)?, m.header.prefix_len).ok()
        })
        .collect())
}

/// The IPv4 default routes of the main table: (gateway, output interface index).
async fn default_routes(h: &Handle, ns: &Namespace) -> Result<Vec<(Ipv4Addr, u32)>, LinkError> {
    let messages: Vec<RouteMessage> = h
        .route()
        .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
        .execute()
        .try_collect()
        .await
        .map_err(|e| netlink("list the IPv4 routes".to_owned(), ns, e))?;
    Ok(messages
        .iter()
        .filter(|m| m.header.destination_prefix_length == 0 && route_table(m) == MAIN_TABLE)
        .filter_map(|m| {
            let gateway = m.attributes.iter().find_map(|a| match a {
                RouteAttribute::Gateway(RouteAddress::Inet(gw)) => Some(*gw),
                _ => None,
            })?;
            let oif = m.attributes.iter().find_map(|a| match a {
                RouteAttribute::Oif(index) => Some(*index),
                _ => None,
            })?;
            Some((gateway, oif))
        })
        .collect())
}

fn route_table(m: &RouteMessage) -> u32 {
    m.attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(table) => Some(*table),
            _ => None,
        })
        .unwrap_or_else(|| u32::from(m.header.table))
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;
    use std::thread::JoinHandle;

    use nix::sched::unshare;

    use super::*;

    #[test]
    fn interface_names_linux_accepts_are_valid() {
        for name in [
            "eth0",
            "shb-1001",
            "shv3fa9c2e1",
            "a",
            "x".repeat(15).as_str(),
            "v_1.2@x",
        ] {
            assert!(validate_name(name).is_ok(), "{name:?} refused");
        }
    }

    #[test]
    fn interface_names_linux_refuses_are_invalid_with_the_reason() {
        let cases = [
            ("", "empty"),
            ("sixteen-bytes-xx", "longer than 15"),
            ("é".repeat(8).as_str(), "longer than 15"),
            (".", "reserved"),
            ("..", "reserved"),
            ("a/b", "`/`"),
            ("eth0:1", "`:`"),
            ("eth 0", "whitespace"),
            ("eth0\n", "whitespace"),
            ("eth\t0", "whitespace"),
            ("eth\x00a", "NUL"),
        ]
        .map(|(n, r)| (n.to_owned(), r));
        for (name, reason) in cases {
            match validate_name(&name) {
                Err(e @ LinkError::InvalidName { .. }) => {
                    let text = e.to_string();
                    assert!(text.contains(reason), "{name:?}: {text}");
                    assert!(text.contains("1 to 15 bytes"), "{name:?}: {text}");
                }
                other => panic!("{name:?} gave {other:?}"),
            }
        }
    }

    #[test]
    fn an_attachment_is_checked_before_anything_is_touched() {
        let mut a = attachment(Path::new("/nonexistent"), "shv1", "eth0", 2);
        assert!(a.validate().is_ok());
        a.gateway = Some(Ipv4Addr::new(198, 18, 2, 1));
        assert!(matches!(
            a.validate(),
            Err(LinkError::GatewayOutsideSubnet { .. })
        ));
        a.gateway = None;
        a.bridge = "br/0".to_owned();
        assert!(matches!(a.validate(), Err(LinkError::InvalidName { .. })));
    }

    // -- Root tests. Each runs in a node namespace of its own (`on_private_node`): the host's
    // namespace is never touched, and tests can run in parallel with the same names.

    fn require_root() {
        assert!(
            shoal_netns::is_root(),
            "this test needs root to create network namespaces; run it as root, \
             e.g. `sudo -E cargo test -p shoal-control --lib links`"
        );
    }

    /// Runs `body` on a new thread that first moves into a new network namespace of its own
    /// (the "node"), with a single-threaded runtime; the namespace and everything in it
    /// vanish with the thread. A panic in `body` fails the test.
    fn on_private_node<F, Fut>(body: F)
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = ()>,
    {
        require_root();
        let thread = std::thread::spawn(move || {
            unshare(CloneFlags::CLONE_NEWNET).expect("unshare(CLONE_NEWNET) for the node");
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(body());
        });
        if let Err(panic) = thread.join() {
            std::panic::resume_unwind(panic);
        }
    }

    /// A container's network namespace: held by a parked thread that made it with `unshare`,
    /// named by that thread's `/proc/PID/task/TID/ns/net`. Dropping the guard (also while
    /// unwinding) ends the thread, which removes the namespace and its devices.
    struct ContainerNs {
        path: PathBuf,
        stop: Option<mpsc::Sender<()>>,
        thread: Option<JoinHandle<()>>,
    }

    impl ContainerNs {
        fn new() -> ContainerNs {
            let (ready_tx, ready_rx) = mpsc::channel();
            let (stop_tx, stop_rx) = mpsc::channel::<()>();
            let thread = std::thread::spawn(move || {
                let made = unshare(CloneFlags::CLONE_NEWNET).map(|()| nix::unistd::gettid());
                let _ = ready_tx.send(made);
                // Returns when the guard drops the sender.
                let _ = stop_rx.recv();
            });
            let mut guard = ContainerNs {
                path: PathBuf::new(),
                stop: Some(stop_tx),
                thread: Some(thread),
            };
            let tid = ready_rx
                .recv()
                .expect("namespace thread")
                .expect("unshare(CLONE_NEWNET) for the container");
            guard.path = PathBuf::from(format!("/proc/{}/task/{tid}/ns/net", std::process::id()));
            guard
        }

        /// Runs `work` in this namespace, with its own netlink connection.
        async fn query<T, F, Fut>(&self, work: F) -> T
        where
            T: Send + 'static,
            F: FnOnce(Handle, Namespace) -> Fut + Send + 'static,
            Fut: Future<Output = Result<T, LinkError>>,
        {
            let netns = open_netns(&self.path).expect("open the container's namespace");
            in_netns(&netns, &self.path, work)
                .await
                .expect("query in the container's namespace")
        }

        async fn snapshot(&self) -> Vec<String> {
            self.query(|h, ns| async move { Ok(snapshot(&h, &ns).await) })
                .await
        }

        async fn link(&self, name: &str) -> Option<LinkMessage> {
            let name = name.to_owned();
            self.query(move |h, ns| async move { get_link(&h, &name, &ns).await })
                .await
        }
    }

    impl Drop for ContainerNs {
        fn drop(&mut self) {
            drop(self.stop.take());
            if let Some(thread) = self.thread.take() {
                let _ = thread.join();
            }
        }
    }

    /// Everything a test could change in a namespace: links (index, name, kind, master, MTU,
    /// MAC, up), their IPv4 addresses and the IPv4 routes of every table.
    async fn snapshot(h: &Handle, ns: &Namespace) -> Vec<String> {
        let links: Vec<LinkMessage> = h
            .link()
            .get()
            .execute()
            .try_collect()
            .await
            .expect("list links");
        let mut out = Vec::new();
        for l in &links {
            let index = l.header.index;
            let name = l.attributes.iter().find_map(|a| match a {
                LinkAttribute::IfName(n) => Some(n.clone()),
                _ => None,
            });
            out.push(format!(
                "link {index} {name:?} {:?} master={:?} mtu={:?} mac={:?} up={}",
                link_kind(l),
                controller(l),
                link_mtu(l),
                link_mac(l),
                is_up(l)
            ));
            for a in ipv4_addresses(h, index, ns).await.expect("addresses") {
                out.push(format!("address {index} {a}"));
            }
        }
        let routes: Vec<RouteMessage> = h
            .route()
            .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
            .execute()
            .try_collect()
            .await
            .expect("list routes");
        for r in &routes {
            let mut attrs: Vec<String> = r
                .attributes
                .iter()
                .filter(|a| {
                    matches!(
                        a,
                        RouteAttribute::Destination(_)
                            | RouteAttribute::Gateway(_)
                            | RouteAttribute::Oif(_)
                            | RouteAttribute::Table(_)
                    )
                })
                .map(|a| format!("{a:?}"))
                .collect();
            attrs.sort();
            out.push(format!(
                "route /{} {:?} {attrs:?}",
                r.header.destination_prefix_length, r.header.kind
            ));
        }
        out.sort();
        out
    }

    const BRIDGE: &str = "shb-1001";
    const GATEWAY: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 1);

    /// Container number `n` on 198.18.1.0/24, on [`BRIDGE`], gateway [`GATEWAY`].
    fn attachment(netns: &Path, host: &str, ifname: &str, n: u8) -> Attach {
        Attach {
            bridge: BRIDGE.to_owned(),
            host_ifname: host.to_owned(),
            netns: netns.to_owned(),
            ifname: ifname.to_owned(),
            mac: [0x02, 0x42, 0xc6, 0x12, 0x01, n],
            address: Ipv4Net::new(Ipv4Addr::new(198, 18, 1, n), 24).expect("prefix"),
            gateway: Some(GATEWAY),
            mtu: 1450,
        }
    }

    /// Makes the veth pair `name` / `name` + "p", both up: a spare device to test with.
    async fn spare_veth(h: &Handle, name: &str, ns: &Namespace) -> Result<(), LinkError> {
        let peer = format!("{name}p");
        h.link()
            .add(LinkVeth::new(name, &peer).up().build())
            .execute()
            .await
            .map_err(|e| netlink(format!("add {name}"), ns, e))?;
        let index = link_index(h, &peer, ns).await?;
        h.link()
            .change(LinkUnspec::new_with_index(index).up().build())
            .execute()
            .await
            .map_err(|e| netlink(format!("bring {peer} up"), ns, e))
    }

    async fn node_link(links: &Links, name: &str) -> Option<LinkMessage> {
        get_link(&links.handle, name, &Namespace::Node)
            .await
            .expect("look up a link on the node")
    }

    #[test]
    fn root_ensure_bridge_is_idempotent_and_set_master_makes_a_port() {
        on_private_node(|| async {
            let links = Links::new().await.expect("netlink");
            let first = links.ensure_bridge(BRIDGE, 1450).await.expect("bridge");
            let again = links.ensure_bridge(BRIDGE, 1400).await.expect("again");
            assert_eq!(first, again, "the existing bridge is kept");
            let bridge = node_link(&links, BRIDGE).await.expect("bridge exists");
            assert_eq!(link_kind(&bridge), Some(&InfoKind::Bridge));
            assert_eq!(link_mtu(&bridge), Some(1400), "the second MTU is set");
            assert!(is_up(&bridge));

            // One end of a veth pair stands in for the network's TAP device (this kernel may have
            // no dummy devices).
            spare_veth(&links.handle, "shtap1001", &Namespace::Node)
                .await
                .expect("make a veth pair");
            links.set_master("shtap1001", BRIDGE).await.expect("master");
            let port = node_link(&links, "shtap1001").await.expect("port exists");
            assert_eq!(controller(&port), Some(first));
            assert!(is_up(&port));
            // Idempotent too, and a bridge with a port is still kept.
            links.set_master("shtap1001", BRIDGE).await.expect("again");
            assert_eq!(links.ensure_bridge(BRIDGE, 1450).await.ok(), Some(first));
            let port = node_link(&links, "shtap1001").await.expect("port exists");
            assert_eq!(controller(&port), Some(first), "still a port");

            let e = links.ensure_bridge("shtap1001", 1450).await;
            assert!(
                matches!(&e, Err(LinkError::WrongKind { kind, .. }) if kind == "a veth"),
                "{e:?}"
            );
            let e = links.set_master("shtap1001", "shb-none").await;
            assert!(
                matches!(&e, Err(LinkError::NotFound { name, ns: Namespace::Node }) if name == "shb-none"),
                "{e:?}"
            );
            let e = links.set_master("shtap-none", BRIDGE).await;
            assert!(
                matches!(&e, Err(LinkError::NotFound { name, .. }) if name == "shtap-none"),
                "{e:?}"
            );
            let e = links.set_master("shtap1001", "shtap1001").await;
            assert!(matches!(&e, Err(LinkError::WrongKind { .. })), "{e:?}");
            let e = links.ensure_bridge("bad/name", 1450).await;
            assert!(matches!(&e, Err(LinkError::InvalidName { .. })), "{e:?}");

            assert!(links.exists(BRIDGE).await.expect("exists"));
            assert!(links.delete(BRIDGE).await.expect("delete"));
            assert!(!links.exists(BRIDGE).await.expect("exists"));
            assert!(!links.delete(BRIDGE).await.expect("delete again"));
        });
    }

    #[test]
    fn root_attach_check_and_delete_a_container() {
        on_private_node(|| async {
            let links = Links::new().await.expect("netlink");
            let bridge = links.ensure_bridge(BRIDGE, 1450).await.expect("bridge");
            let c = ContainerNs::new();
            let a = attachment(&c.path, "shv3fa9c2e1", "eth0", 2);
            links.attach(&a).await.expect("attach");
            links.check(&a).await.expect("check");

            let host = node_link(&links, &a.host_ifname).await.expect("host end");
            assert_eq!(link_kind(&host), Some(&InfoKind::Veth));
            assert_eq!(controller(&host), Some(bridge));
            assert_eq!(link_mtu(&host), Some(1450));
            assert!(is_up(&host));
            assert!(
                node_link(&links, "eth0").await.is_none(),
                "peer left on the node"
            );

            // The container's side, read by netlink queries in its own namespace.
            let (eth0, lo, addresses, routes) = c
                .query(|h, ns| async move {
                    let eth0 = get_link(&h, "eth0", &ns).await?;
                    let lo = get_link(&h, "lo", &ns).await?;
                    let index = eth0.as_ref().map_or(0, |l| l.header.index);
                    let addresses = ipv4_addresses(&h, index, &ns).await?;
                    let routes = default_routes(&h, &ns).await?;
                    Ok((eth0, lo, addresses, routes))
                })
                .await;
            let eth0 = eth0.expect("eth0 in the container");
            assert_eq!(link_kind(&eth0), Some(&InfoKind::Veth));
            assert_eq!(link_mac(&eth0), Some(&a.mac[..]));
            assert_eq!(link_mtu(&eth0), Some(1450));
            assert!(is_up(&eth0));
            assert_eq!(addresses, vec![a.address]);
            assert_eq!(routes, vec![(GATEWAY, eth0.header.index)]);
            assert!(is_up(&lo.expect("lo")), "loopback up");

            // The same host name again: Exists, and nothing changed on either side.
            let node_before = snapshot(&links.handle, &Namespace::Node).await;
            let container_before = c.snapshot().await;
            let same_host = Attach {
                ifname: "eth1".to_owned(),
                ..attachment(&c.path, &a.host_ifname, "eth1", 3)
            };
            let e = links.attach(&same_host).await;
            assert!(
                matches!(&e, Err(LinkError::Exists { name, ns: Namespace::Node }) if *name == a.host_ifname),
                "{e:?}"
            );
            // The same name in the container, with a new host name: Exists there.
            let same_ifname = attachment(&c.path, "shv00000002", "eth0", 3);
            let e = links.attach(&same_ifname).await;
            assert!(
                matches!(&e, Err(LinkError::Exists { name, ns: Namespace::Container(p) }) if name == "eth0" && *p == c.path),
                "{e:?}"
            );
            assert_eq!(snapshot(&links.handle, &Namespace::Node).await, node_before);
            assert_eq!(c.snapshot().await, container_before);

            // CHECK names what differs.
            let mut wrong = a.clone();
            wrong.mac[5] = 0x99;
            match links.check(&wrong).await {
                Err(e @ LinkError::Mismatch { .. }) => {
                    let LinkError::Mismatch {
                        differences, ns, ..
                    } = &e
                    else {
                        unreachable!()
                    };
                    assert_eq!(ns, &a.container());
                    assert_eq!(differences.len(), 1, "{e}");
                    assert_eq!(differences[0].what, "MAC");
                    assert!(
                        e.to_string()
                            .contains("MAC is 02:42:c6:12:01:02, expected 02:42:c6:12:01:99"),
                        "{e}"
                    );
                }
                other => panic!("check with a wrong MAC gave {other:?}"),
            }
            let mut wrong = a.clone();
            wrong.mtu = 1400;
            wrong.address = Ipv4Net::new(Ipv4Addr::new(198, 18, 1, 9), 24).expect("prefix");
            match links.check(&wrong).await {
                Err(LinkError::Mismatch { differences, .. }) => {
                    let what: Vec<&str> = differences.iter().map(|d| d.what).collect();
                    assert_eq!(what, ["MTU", "address"]);
                }
                other => panic!("check with a wrong MTU and address gave {other:?}"),
            }
            let e = links
                .check(&Attach {
                    bridge: "shb-1002".to_owned(),
                    ..a.clone()
                })
                .await;
            assert!(matches!(&e, Err(LinkError::NotFound { .. })), "{e:?}");

            // A second container with no gateway: no default route there.
            let c2 = ContainerNs::new();
            let b = Attach {
                gateway: None,
                ..attachment(&c2.path, "shv00000003", "eth0", 3)
            };
            links.attach(&b).await.expect("attach without a gateway");
            links.check(&b).await.expect("check");
            let routes = c2
                .query(|h, ns| async move { default_routes(&h, &ns).await })
                .await;
            assert!(routes.is_empty(), "{routes:?}");
            let e = links
                .check(&Attach {
                    gateway: Some(GATEWAY),
                    ..b.clone()
                })
                .await;
            assert!(
                matches!(&e, Err(LinkError::Mismatch { differences, .. }) if differences[0].what == "default route"),
                "{e:?}"
            );

            // Deleting the host end takes the container's end with it.
            assert!(links.delete(&a.host_ifname).await.expect("delete"));
            assert!(!links.exists(&a.host_ifname).await.expect("exists"));
            assert!(c.link("eth0").await.is_none(), "container end left behind");
            assert!(!links.delete(&a.host_ifname).await.expect("delete again"));
            let e = links.check(&a).await;
            assert!(
                matches!(&e, Err(LinkError::NotFound { name, ns: Namespace::Node }) if *name == a.host_ifname),
                "{e:?}"
            );
            assert!(
                c2.link("eth0").await.is_some(),
                "the other container untouched"
            );

            let path = c.path.clone();
            drop(c);
            assert!(!path.exists(), "the container namespace's thread is gone");
        });
    }

    #[test]
    fn root_a_failed_attach_leaves_nothing_behind() {
        on_private_node(|| async {
            let links = Links::new().await.expect("netlink");
            links.ensure_bridge(BRIDGE, 1450).await.expect("bridge");
            // The network's TAP device (a stand-in) on the bridge, as in real use: a bridge
            // takes its MAC from its ports, and one left with none keeps the last one's, which
            // a pair made and deleted again would otherwise change.
            spare_veth(&links.handle, "shtap1001", &Namespace::Node)
                .await
                .expect("make a veth pair");
            links.set_master("shtap1001", BRIDGE).await.expect("master");
            let host = "shv3fa9c2e1";
            let node_before = snapshot(&links.handle, &Namespace::Node).await;

            // No such namespace (the container is gone).
            let dir = tempfile::tempdir().expect("tempdir");
            let gone = dir.path().join("gone");
            let e = links.attach(&attachment(&gone, host, "eth0", 2)).await;
            assert!(
                matches!(&e, Err(LinkError::NoNetns { path, .. }) if *path == gone),
                "{e:?}"
            );
            let e = links.check(&attachment(&gone, host, "eth0", 2)).await;
            assert!(matches!(&e, Err(LinkError::NoNetns { .. })), "{e:?}");
            // A file that is not a network namespace.
            let plain = dir.path().join("plain");
            std::fs::write(&plain, b"not a namespace").expect("write");
            let e = links.attach(&attachment(&plain, host, "eth0", 2)).await;
            assert!(
                matches!(&e, Err(LinkError::NoNetns { reason, .. }) if reason.contains("not a network namespace")),
                "{e:?}"
            );
            assert!(!links.exists(host).await.expect("exists"));

            let c = ContainerNs::new();
            let container_before = c.snapshot().await;
            // No bridge.
            let e = links
                .attach(&Attach {
                    bridge: "shb-none".to_owned(),
                    ..attachment(&c.path, host, "eth0", 2)
                })
                .await;
            assert!(
                matches!(&e, Err(LinkError::NotFound { name, .. }) if name == "shb-none"),
                "{e:?}"
            );
            // Names and gateway refused before anything is touched.
            let e = links.attach(&attachment(&c.path, host, "eth 0", 2)).await;
            assert!(matches!(&e, Err(LinkError::InvalidName { .. })), "{e:?}");
            let e = links
                .attach(&Attach {
                    gateway: Some(Ipv4Addr::new(198, 18, 9, 1)),
                    ..attachment(&c.path, host, "eth0", 2)
                })
                .await;
            assert!(
                matches!(&e, Err(LinkError::GatewayOutsideSubnet { .. })),
                "{e:?}"
            );
            assert_eq!(snapshot(&links.handle, &Namespace::Node).await, node_before);
            assert_eq!(c.snapshot().await, container_before);

            // A failure after the pair is made: the container already has a default route, so
            // adding ours fails, and the pair is deleted again.
            c.query(|h, ns| async move {
                spare_veth(&h, "dm0", &ns).await?;
                let index = link_index(&h, "dm0", &ns).await?;
                h.address()
                    .add(index, IpAddr::V4(Ipv4Addr::new(198, 18, 9, 1)), 24)
                    .execute()
                    .await
                    .map_err(|e| netlink("address dm0".to_owned(), &ns, e))?;
                let route = RouteMessageBuilder::<Ipv4Addr>::new()
                    .gateway(Ipv4Addr::new(198, 18, 9, 254))
                    .output_interface(index)
                    .build();
                h.route()
                    .add(route)
                    .execute()
                    .await
                    .map_err(|e| netlink("route via dm0".to_owned(), &ns, e))
            })
            .await;
            let container_before = c.snapshot().await;
            let a = attachment(&c.path, host, "eth0", 2);
            let e = links.attach(&a).await;
            match &e {
                Err(e @ LinkError::Netlink { ns, .. }) => {
                    assert_eq!(ns, &a.container());
                    assert_eq!(e.errno(), Some(Errno::EEXIST));
                    assert!(
                        e.to_string().contains("default route via 198.18.1.1"),
                        "{e}"
                    );
                }
                other => panic!("attach over an existing default route gave {other:?}"),
            }
            assert!(
                !links.exists(host).await.expect("exists"),
                "host end left behind"
            );
            assert!(c.link("eth0").await.is_none(), "container end left behind");
            assert_eq!(snapshot(&links.handle, &Namespace::Node).await, node_before);
            assert_eq!(c.snapshot().await, container_before);
            // Without the gateway the same attachment works.
            links
                .attach(&Attach { gateway: None, ..a })
                .await
                .expect("attach");
        });
    }

    fn tc_filters(dev: &str) -> String {
        let out = std::process::Command::new("tc")
            .args(["filter", "show", "dev", dev, "ingress"])
            .output()
            .expect("tc (iproute2)");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    #[test]
    fn steering_puts_published_ports_on_the_mesh_device_and_takes_them_off() {
        require_root();
        on_private_node(|| async {
            let links = Links::new().await.expect("netlink");
            let ns = Namespace::Node;
            spare_veth(&links.handle, "ul0", &ns)
                .await
                .expect("underlay");
            spare_veth(&links.handle, "mesh0", &ns)
                .await
                .expect("mesh device");
            // Someone else's filter on the underlay: never touched.
            let ul0 = link_index(&links.handle, "ul0", &ns).await.expect("ul0");
            ensure_ingress_qdisc(&links.handle, ul0, &ns)
                .await
                .expect("qdisc");
            let other = std::process::Command::new("tc")
                .args(["filter", "add", "dev", "ul0", "ingress", "pref", "7"])
                .args([
                    "protocol", "ip", "u32", "match", "u32", "0", "0", "classid", "1:1",
                ])
                .status();
            assert!(other.expect("tc").success());
            let addr = Ipv4Addr::new(198, 18, 0, 1);
            let rules = [(6, addr, 8080), (17, addr, 5353)];
            links
                .set_steering("ul0", "mesh0", &rules)
                .await
                .expect("steer");
            // Twice: the band is rebuilt, not doubled.
            links
                .set_steering("ul0", "mesh0", &rules)
                .await
                .expect("again");
            let ul = tc_filters("ul0");
            assert_eq!(
                ul.matches("match c6120001/ffffffff at 16").count(),
                2,
                "{ul}"
            );
            assert!(ul.contains("match 00001f90/0000ffff at 20"), "{ul}"); // 8080
            assert!(ul.contains("match 000014e9/0000ffff at 20"), "{ul}"); // 5353
            assert!(ul.contains("match 00110000/00ff0000 at 8"), "{ul}"); // UDP
            assert!(ul.contains("Egress Redirect to device mesh0"), "{ul}");
            let mesh = tc_filters("mesh0");
            assert!(mesh.contains("Egress Redirect to device ul0"), "{mesh}");
            // One port left, then none.
            links
                .set_steering("ul0", "mesh0", &rules[..1])
                .await
                .expect("one");
            assert_eq!(tc_filters("ul0").matches("at 16").count(), 1);
            links.set_steering("ul0", "mesh0", &[]).await.expect("none");
            let (ul, mesh) = (tc_filters("ul0"), tc_filters("mesh0"));
            assert!(
                !ul.contains("pref 21320") && !mesh.contains("pref 21320"),
                "{ul}{mesh}"
            );
            assert!(ul.contains("pref 7"), "another's filter stays: {ul}");
            // A device that is not there: a clear error.
            let e = links
                .set_steering("nope0", "mesh0", &rules)
                .await
                .unwrap_err();
            assert!(e.to_string().contains("no interface nope0"), "{e}");
        });
    }
}
