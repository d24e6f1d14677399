//! `shoal agent`.

use std::path::PathBuf;

use crate::agent::AgentConfig;
use crate::cli::CliError;

/// `shoal agent` flags.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Directory for the node key, membership and manager state.
    #[arg(long, default_value = "/var/lib/shoal")]
    state_dir: PathBuf,
    /// This node's host name (default: the system host name).
    #[arg(long)]
    hostname: Option<String>,
    /// Where gossip listens, IP:PORT (default: the node's advertise address, port 7946).
    #[arg(long)]
    gossip_addr: Option<std::net::SocketAddr>,
    /// Name of the ingress overlay interface.
    #[arg(long, default_value = shoal_ingress::network::INGRESS_INTERFACE)]
    overlay_interface: String,
    /// MTU of the underlay; the overlay interface gets this less the encapsulation.
    #[arg(long, default_value_t = crate::agent::datapath::DEFAULT_UNDERLAY_MTU)]
    underlay_mtu: u16,
    /// Run the control plane only: no overlay interface, no data path on this node (for
    /// control-plane tests that run several agents in one network namespace).
    #[arg(long)]
    no_data_path: bool,
    /// Let the members of this group use the agent's socket (mode 0660), as the docker group
    /// does; root and the agent's own user always may.
    #[arg(long, value_name = "GROUP")]
    socket_group: Option<String>,
    /// Serve Prometheus metrics at http://ADDR/metrics (IP:PORT; off by default).
    #[arg(long, value_name = "ADDR")]
    metrics_addr: Option<std::net::SocketAddr>,
    /// The routing mesh's flow timeouts, as `syn=30s,closing=10s,udp=2m` (any of the three;
    /// the others keep their defaults). An established TCP flow has none: it stays until it
    /// closes (`docs/services.md`).
    #[arg(long, env = "SHOAL_MESH_TIMEOUTS", value_name = "LIST", value_parser = parse_timeouts)]
    mesh_timeouts: Option<shoal_ingress::mesh::flows::Timeouts>,
    /// The most flows the routing mesh tracks on this node; new ones are refused (and
    /// counted) past it.
    #[arg(long, default_value_t = shoal_ingress::mesh::DEFAULT_MAX_FLOWS)]
    mesh_max_flows: usize,
    /// Log lines as text for people or JSON objects for machines.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

/// `--log-format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One readable line per event.
    Text,
    /// One JSON object per line.
    Json,
}

pub(super) async fn run(args: Args, socket: PathBuf) -> Result<(), CliError> {
    let hostname = match args.hostname {
        Some(h) => h,
        None => std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .ok()
            .filter(|h| !h.is_empty())
            .ok_or_else(|| CliError::Usage("cannot read the host name; pass --hostname".into()))?,
    };
    let config = AgentConfig {
        state_dir: args.state_dir,
        socket,
        hostname,
        gossip_addr: args.gossip_addr,
        data_path: (!args.no_data_path).then_some(crate::agent::datapath::Params {
            interface: args.overlay_interface,
            underlay_mtu: args.underlay_mtu,
            // Drawn and stored by the agent before every start of the data path.
            incarnation: shoal_vxlan::crypto::Incarnation::default(),
            mesh_timeouts: args.mesh_timeouts.unwrap_or_default(),
            mesh_max_flows: args.mesh_max_flows,
        }),
        metrics_addr: args.metrics_addr,
        socket_group: args.socket_group,
    };
    crate::agent::run(config, shutdown_signal()).await?;
    Ok(())
}

/// Reads `--mesh-timeouts`: `NAME=DURATION` pairs, comma-separated, NAME one of `syn`,
/// `closing`, `udp`.
fn parse_timeouts(text: &str) -> Result<shoal_ingress::mesh::flows::Timeouts, String> {
    let mut t = shoal_ingress::mesh::flows::Timeouts::default();
    for pair in text.split(',').filter(|p| !p.is_empty()) {
        let (name, value) = pair
            .split_once('=')
            .ok_or_else(|| format!("{pair:?} is not NAME=DURATION (syn=30s, say)"))?;
        let ms = super::service::parse_duration_ms(value)?;
        let d = std::time::Duration::from_millis(u64::from(ms));
        match name {
            "syn" => t.syn = d,
            "closing" => t.closing = d,
            "udp" => t.udp = d,
            other => {
                return Err(format!(
                    "unknown timeout {other:?}: use syn, closing or udp"
                ))
            }
        }
    }
    Ok(t)
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            tracing::warn!("cannot install signal handlers; stop the agent with SIGKILL");
            std::future::pending::<()>().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn mesh_timeouts_are_read_by_name_and_refuse_the_rest() {
        let t = parse_timeouts("syn=2s,udp=500ms").unwrap();
        assert_eq!(
            (t.syn, t.udp),
            (Duration::from_secs(2), Duration::from_millis(500))
        );
        assert_eq!(
            t.closing,
            shoal_ingress::mesh::flows::Timeouts::default().closing
        );
        assert!(parse_timeouts("idle=1s")
            .unwrap_err()
            .contains("unknown timeout"));
        assert!(parse_timeouts("syn").unwrap_err().contains("NAME=DURATION"));
        assert!(parse_timeouts("syn=soon").is_err());
    }
}
