//! `shoal init`.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;

use crate::api::{InitRequest, Reply, Request};
use crate::cli::{call, unexpected, CliError};

/// `shoal init` flags.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Address other nodes reach this one at.
    #[arg(long, required_unless_present = "force_new_cluster")]
    advertise_addr: Option<IpAddr>,
    /// On a manager of a swarm that lost the quorum of its managers: form a new swarm with
    /// this manager alone, from its state (nodes, keys, tokens); the other managers become
    /// workers. Takes no other flag.
    #[arg(
        long,
        conflicts_with_all = [
            "advertise_addr", "listen_addr", "data_path_port", "ingress_subnet", "no_encrypt",
            "key_rotation_interval", "cert_expiry", "default_addr_pool",
            "default_addr_pool_mask_length",
        ]
    )]
    force_new_cluster: bool,
    /// Address the manager API listens on.
    #[arg(long, default_value = "0.0.0.0:2377")]
    listen_addr: SocketAddr,
    /// UDP port of the data path.
    #[arg(long, default_value_t = 4789)]
    data_path_port: u16,
    /// Subnet of the ingress overlay network.
    #[arg(long, default_value = "10.0.0.0/24")]
    ingress_subnet: String,
    /// Plain RFC 7348 VXLAN on the data path (no encryption).
    #[arg(long)]
    no_encrypt: bool,
    /// How often the network keys rotate: a number with s, m, h or d (e.g. 12h).
    #[arg(long, default_value = "12h", value_parser = parse_interval)]
    key_rotation_interval: u64,
    /// How long node certificates are valid (nodes renew theirs with a third left): a number
    /// with s, m, h or d, as docker's `--cert-expiry` (default 2160h, 90 days).
    #[arg(long, default_value = "2160h", value_parser = parse_interval)]
    cert_expiry: u64,
    /// Address pool that user networks' subnets come from, CIDR (may be repeated; default
    /// 10.0.0.0/8).
    #[arg(long, value_delimiter = ',')]
    default_addr_pool: Vec<String>,
    /// Prefix length of each network's subnet from those pools (default 24).
    #[arg(long)]
    default_addr_pool_mask_length: Option<u8>,
}

fn init_request(advertise_addr: IpAddr, args: Args) -> Request {
    Request::Init(InitRequest {
        advertise_addr,
        listen_addr: args.listen_addr,
        data_path_port: args.data_path_port,
        ingress_subnet: args.ingress_subnet,
        encrypt: !args.no_encrypt,
        key_rotation_secs: args.key_rotation_interval,
        cert_expiry_secs: args.cert_expiry,
        default_addr_pools: args.default_addr_pool,
        default_addr_pool_mask: args.default_addr_pool_mask_length,
    })
}

/// Parses `<n>s|m|h|d` into seconds (at least 1 s).
pub fn parse_interval(text: &str) -> Result<u64, String> {
    let bad = || format!("invalid interval {text:?}: use a number with s, m, h or d, such as 12h");
    let split = text.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
    let (num, unit) = text.split_at(split);
    let n: u64 = num.parse().map_err(|_| bad())?;
    let mult = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(bad()),
    };
    match n.checked_mul(mult) {
        Some(0) => Err(format!("invalid interval {text:?}: it must be at least 1s")),
        Some(secs) => Ok(secs),
        None => Err(bad()),
    }
}

pub(super) async fn run(args: Args, socket: &Path) -> Result<(), CliError> {
    let request = match args.advertise_addr {
        _ if args.force_new_cluster => Request::ForceNewCluster,
        Some(advertise_addr) => init_request(advertise_addr, args),
        None => return Err(CliError::Usage("--advertise-addr is required".into())),
    };
    let reply = call(socket, request).await?;
    let Reply::Initialized {
        node_id,
        worker_token,
        join_addr,
    } = reply
    else {
        return Err(unexpected(&reply));
    };
    outln!("Swarm initialized: current node ({node_id}) is now a manager.");
    outln!();
    outln!("To add a worker to this swarm, run the following command:");
    outln!();
    outln!("    shoal join --token {worker_token} {join_addr}");
    outln!();
    outln!("To add a manager to this swarm, run 'shoal join-token manager' and follow the instructions.");
    outln!();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::parse_interval;

    #[test]
    fn intervals() {
        assert_eq!(parse_interval("12h"), Ok(43_200));
        assert_eq!(parse_interval("30m"), Ok(1800));
        assert_eq!(parse_interval("1s"), Ok(1));
        assert_eq!(parse_interval("2d"), Ok(172_800));
        for bad in [
            "",
            "h",
            "12",
            "12x",
            "0s",
            "-1h",
            "1.5h",
            "99999999999999999999d",
        ] {
            assert!(parse_interval(bad).is_err(), "{bad}");
        }
    }
}
