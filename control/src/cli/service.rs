//! `shoal service create|ls|inspect|rm|update|backend` (on a manager), docker's shapes.

use std::path::Path;

use crate::api::{AdminRequest, PublishRm, Reply, Request, ServiceCreateArgs, ServiceDetail};
use crate::cli::{call, unexpected, CliError};
use shoal_proto::publish::{parse_publish, parse_publish_rm};
use shoal_proto::view::{EndpointMode, HealthV1};

/// `shoal service` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum Cmd {
    /// Create a service: a name, a virtual IP on a user network, published ports.
    Create(Create),
    /// List the services.
    #[command(alias = "list")]
    Ls,
    /// Show services as JSON: network, endpoint mode, VIP, ports, backends, health check.
    Inspect {
        /// Names or IDs.
        #[arg(required = true)]
        services: Vec<String>,
    },
    /// Remove services.
    #[command(alias = "remove")]
    Rm {
        /// Names or IDs.
        #[arg(required = true)]
        services: Vec<String>,
    },
    /// Change a service's published ports.
    Update(Update),
    /// Add or remove a backend by hand.
    #[command(subcommand)]
    Backend(BackendCmd),
}

/// `shoal service create` flags, docker's.
#[derive(Debug, clap::Args)]
pub struct Create {
    /// The user network the service's VIP and backends are on.
    #[arg(long)]
    network: String,
    /// Publish a port: [mode=ingress|host,]PUBLISHED:TARGET[/tcp|/udp], or
    /// published=P,target=T[,protocol=udp][,mode=host].
    #[arg(short, long, value_name = "SPEC")]
    publish: Vec<String>,
    /// vip (a virtual IP, the default) or dnsrr (DNS round robin).
    #[arg(long, value_enum, default_value = "vip")]
    endpoint_mode: Mode,
    /// Time between health checks of each backend, e.g. 250ms, 1s.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration_ms)]
    health_interval: Option<u32>,
    /// Failed checks in a row before a backend gets no new connection.
    #[arg(long, value_name = "N")]
    health_retries: Option<u32>,
    /// The service's name.
    name: String,
}

/// `--endpoint-mode`.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum Mode {
    Vip,
    Dnsrr,
}

/// `shoal service update` flags.
#[derive(Debug, clap::Args)]
pub struct Update {
    /// Publish a port (as `create --publish`).
    #[arg(long, value_name = "SPEC")]
    publish_add: Vec<String>,
    /// Stop publishing a port: PUBLISHED[/tcp|/udp].
    #[arg(long, value_name = "PUBLISHED[/PROTO]")]
    publish_rm: Vec<String>,
    /// The service.
    service: String,
}

/// `shoal service backend` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum BackendCmd {
    /// Make an endpoint a backend of the service.
    Add(Backend),
    /// Take a backend out of the service.
    #[command(alias = "remove")]
    Rm(Backend),
}

/// A backend as the CLI names it.
#[derive(Debug, clap::Args)]
pub struct Backend {
    /// The service.
    service: String,
    /// Its IP on the service's network, or the ID (or a unique prefix) of a container
    /// attached on this node.
    endpoint: String,
}

/// A duration as docker writes them (`250ms`, `1s`, `1m30s`, `1.5s`), in milliseconds: at
/// least 1 ms.
pub fn parse_duration_ms(text: &str) -> Result<u32, String> {
    let bad = || format!("invalid duration {text:?}: write e.g. 250ms, 1s or 1m30s");
    let mut rest = text.trim();
    let mut total = 0f64;
    if rest.is_empty() {
        return Err(bad());
    }
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(bad)?;
        let number: f64 = rest[..digits].parse().map_err(|_| bad())?;
        rest = &rest[digits..];
        let unit = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let scale = match &rest[..unit] {
            "ms" => 1.0,
            "s" => 1_000.0,
            "m" => 60_000.0,
            "h" => 3_600_000.0,
            _ => return Err(bad()),
        };
        total += number * scale;
        rest = &rest[unit..];
    }
    if !(1.0..=f64::from(u32::MAX)).contains(&total) {
        return Err(format!(
            "invalid duration {text:?}: between 1ms and 49 days"
        ));
    }
    Ok(total.round() as u32)
}

fn publish(specs: &[String]) -> Result<Vec<shoal_proto::view::PortV1>, CliError> {
    specs
        .iter()
        .map(|s| parse_publish(s).map_err(|e| CliError::Usage(e.to_string())))
        .collect()
}

impl Create {
    fn into_args(self) -> Result<ServiceCreateArgs, CliError> {
        let health = match (self.health_interval, self.health_retries) {
            (None, None) => None,
            (interval, retries) => {
                let default = HealthV1::default();
                Some(HealthV1 {
                    interval_ms: interval.unwrap_or(default.interval_ms),
                    retries: retries.unwrap_or(default.retries),
                })
            }
        };
        Ok(ServiceCreateArgs {
            name: self.name,
            network: self.network,
            endpoint_mode: match self.endpoint_mode {
                Mode::Vip => EndpointMode::Vip,
                Mode::Dnsrr => EndpointMode::Dnsrr,
            },
            ports: publish(&self.publish)?,
            health,
        })
    }
}

impl Update {
    fn into_request(self) -> Result<AdminRequest, CliError> {
        let publish_rm = self
            .publish_rm
            .iter()
            .map(|s| {
                parse_publish_rm(s)
                    .map(|(published, protocol)| PublishRm {
                        published,
                        protocol,
                    })
                    .map_err(|e| CliError::Usage(e.to_string()))
            })
            .collect::<Result<_, _>>()?;
        Ok(AdminRequest::ServiceUpdate {
            service: self.service,
            publish_add: publish(&self.publish_add)?,
            publish_rm,
        })
    }
}

/// `service ls`: docker's columns, without IMAGE (shoal runs no images). MODE is the
/// endpoint mode, REPLICAS the number of backends.
pub fn table(services: &[ServiceDetail]) -> String {
    let name_width = services
        .iter()
        .map(|s| s.name.len())
        .max()
        .unwrap_or(0)
        .max(4)
        + 3;
    let mut out = format!(
        "{:<15}{:<name_width$}{:<8}{:<11}PORTS\n",
        "ID", "NAME", "MODE", "REPLICAS"
    );
    for s in services {
        let id: String = s.id.chars().take(12).collect();
        let ports: Vec<String> = s.ports.iter().map(ToString::to_string).collect();
        let line = format!(
            "{id:<15}{:<name_width$}{:<8}{:<11}{}",
            s.name,
            s.endpoint_mode.as_str(),
            s.backends.len(),
            ports.join(", ")
        );
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

pub(super) async fn run(cmd: Cmd, socket: &Path) -> Result<(), CliError> {
    let request = match cmd {
        Cmd::Create(c) => AdminRequest::ServiceCreate(c.into_args()?),
        Cmd::Ls => AdminRequest::ServiceLs,
        Cmd::Inspect { services } => {
            let mut all = Vec::new();
            for service in services {
                match call(
                    socket,
                    Request::Admin(AdminRequest::ServiceInspect { service }),
                )
                .await?
                {
                    Reply::Service(detail) => all.push(*detail),
                    other => return Err(unexpected(&other)),
                }
            }
            let text = serde_json::to_string_pretty(&all)
                .map_err(|e| CliError::Protocol(e.to_string()))?;
            outln!("{text}");
            return Ok(());
        }
        Cmd::Rm { services } => AdminRequest::ServiceRm { services },
        Cmd::Update(u) => u.into_request()?,
        Cmd::Backend(BackendCmd::Add(b)) => AdminRequest::ServiceBackend {
            service: b.service,
            endpoint: b.endpoint,
            present: true,
        },
        Cmd::Backend(BackendCmd::Rm(b)) => AdminRequest::ServiceBackend {
            service: b.service,
            endpoint: b.endpoint,
            present: false,
        },
    };
    match call(socket, Request::Admin(request)).await? {
        Reply::Services(services) => out!("{}", table(&services)),
        Reply::Lines(lines) => {
            for l in lines {
                outln!("{l}");
            }
        }
        other => return Err(unexpected(&other)),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser as _;
    use shoal_proto::view::{PortV1, Protocol, PublishMode};

    fn parse(args: &[&str]) -> Result<crate::cli::Cli, clap::Error> {
        crate::cli::Cli::try_parse_from(std::iter::once("shoal").chain(args.iter().copied()))
    }

    fn port(published: u16, target: u16, protocol: Protocol, mode: PublishMode) -> PortV1 {
        PortV1 {
            published,
            target,
            protocol,
            mode,
        }
    }

    #[test]
    fn create_reads_dockers_flags() {
        let cli = parse(&[
            "service",
            "create",
            "--network",
            "web",
            "--publish",
            "8080:80",
            "-p",
            "mode=host,53:53/udp",
            "--endpoint-mode",
            "dnsrr",
            "--health-interval",
            "1s",
            "front",
        ])
        .unwrap();
        let crate::cli::Cmd::Service(Cmd::Create(c)) = cli.command else {
            panic!("not service create");
        };
        let args = c.into_args().unwrap();
        assert_eq!(args.name, "front");
        assert_eq!(args.network, "web");
        assert_eq!(args.endpoint_mode, EndpointMode::Dnsrr);
        assert_eq!(
            args.ports,
            [
                port(8080, 80, Protocol::Tcp, PublishMode::Ingress),
                port(53, 53, Protocol::Udp, PublishMode::Host)
            ]
        );
        assert_eq!(
            args.health,
            Some(HealthV1 {
                interval_ms: 1000,
                retries: 2
            })
        );
        // A bad spec is one line naming it; no request is made.
        let cli = parse(&[
            "service",
            "create",
            "--network",
            "web",
            "-p",
            "70000:80",
            "x",
        ])
        .unwrap();
        let crate::cli::Cmd::Service(Cmd::Create(c)) = cli.command else {
            panic!("not service create");
        };
        assert_eq!(
            c.into_args().unwrap_err().to_string(),
            r#"invalid publish spec "70000:80": port out of range"#
        );
        assert!(
            parse(&["service", "create", "x"]).is_err(),
            "--network is needed"
        );
        assert!(parse(&[
            "service",
            "create",
            "--network",
            "w",
            "--health-interval",
            "1x",
            "x"
        ])
        .is_err());
    }

    #[test]
    fn update_and_backend_read_their_specs() {
        let cli = parse(&[
            "service",
            "update",
            "--publish-add",
            "published=9090,target=90,protocol=udp",
            "--publish-rm",
            "8080",
            "--publish-rm",
            "53/udp",
            "front",
        ])
        .unwrap();
        let crate::cli::Cmd::Service(Cmd::Update(u)) = cli.command else {
            panic!("not service update");
        };
        assert_eq!(
            u.into_request().unwrap(),
            AdminRequest::ServiceUpdate {
                service: "front".into(),
                publish_add: vec![port(9090, 90, Protocol::Udp, PublishMode::Ingress)],
                publish_rm: vec![
                    PublishRm {
                        published: 8080,
                        protocol: Protocol::Tcp
                    },
                    PublishRm {
                        published: 53,
                        protocol: Protocol::Udp
                    }
                ],
            }
        );
        let cli = parse(&["service", "backend", "add", "front", "10.9.0.2"]).unwrap();
        assert!(matches!(
            cli.command,
            crate::cli::Cmd::Service(Cmd::Backend(BackendCmd::Add(b)))
                if b.service == "front" && b.endpoint == "10.9.0.2"
        ));
    }

    #[test]
    fn durations_as_docker_writes_them() {
        assert_eq!(parse_duration_ms("250ms"), Ok(250));
        assert_eq!(parse_duration_ms("1s"), Ok(1000));
        assert_eq!(parse_duration_ms("1.5s"), Ok(1500));
        assert_eq!(parse_duration_ms("1m30s"), Ok(90_000));
        for bad in ["", "1", "s", "0ms", "1x", "-1s", "2000h"] {
            assert!(parse_duration_ms(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn ls_table_golden() {
        let detail = |id: &str, name: &str, mode, ports, backends: usize| ServiceDetail {
            id: id.repeat(25),
            name: name.into(),
            network: "web".into(),
            network_id: "n".repeat(25),
            endpoint_mode: mode,
            vip: None,
            ports,
            backends: (0..backends)
                .map(|i| std::net::Ipv4Addr::new(10, 9, 0, 2 + i as u8))
                .collect(),
            health: HealthV1 {
                interval_ms: 250,
                retries: 2,
            },
            created_at: 0,
        };
        let services = [
            detail(
                "a",
                "front",
                EndpointMode::Vip,
                vec![
                    port(8080, 80, Protocol::Tcp, PublishMode::Ingress),
                    port(53, 53, Protocol::Udp, PublishMode::Host),
                ],
                2,
            ),
            detail("b", "db", EndpointMode::Dnsrr, vec![], 0),
        ];
        assert_eq!(
            table(&services),
            "ID             NAME    MODE    REPLICAS   PORTS\n\
             aaaaaaaaaaaa   front   vip     2          *:8080->80/tcp, 53->53/udp\n\
             bbbbbbbbbbbb   db      dnsrr   0\n"
        );
    }
}
