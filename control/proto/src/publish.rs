//! `--publish` as docker writes it, read into a [`PortV1`]: the CLI's and the API's one
//! reading of a publish spec. Pure.

use serde::{Deserialize, Serialize};

use crate::view::{PortV1, Protocol, PublishMode};

/// A publish spec that does not read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
#[error("invalid publish spec {spec:?}: {why}")]
pub struct PublishError {
    /// As given.
    pub spec: String,
    /// What is wrong with it.
    pub why: String,
}

/// Reads one `--publish` value: docker's short form `[mode=ingress|host,]PUBLISHED:TARGET[/tcp|/udp]`
/// or its long form `published=8080,target=80[,protocol=udp][,mode=host]` (the two may mix).
pub fn parse_publish(spec: &str) -> Result<PortV1, PublishError> {
    let bad = |why: &str| PublishError {
        spec: spec.to_owned(),
        why: why.to_owned(),
    };
    let (mut published, mut target, mut protocol, mut mode) = (None, None, None, None);
    fn put<T>(slot: &mut Option<T>, value: T) -> Result<(), &'static str> {
        match slot.replace(value) {
            Some(_) => Err("a field is given twice"),
            None => Ok(()),
        }
    }
    for part in spec.split(',').map(str::trim) {
        match part.split_once('=') {
            Some((key, value)) => match key.trim() {
                "published" => put(&mut published, port(spec, value)?).map_err(bad)?,
                "target" => put(&mut target, port(spec, value)?).map_err(bad)?,
                "protocol" => put(&mut protocol, parse_protocol(spec, value)?).map_err(bad)?,
                "mode" => put(
                    &mut mode,
                    match value.trim() {
                        "ingress" => PublishMode::Ingress,
                        "host" => PublishMode::Host,
                        _ => return Err(bad("mode must be ingress or host")),
                    },
                )
                .map_err(bad)?,
                _ => {
                    return Err(bad(
                        "unknown field; use published, target, protocol and mode",
                    ))
                }
            },
            None => {
                let (ports, proto) = match part.split_once('/') {
                    Some((ports, proto)) => (ports, Some(parse_protocol(spec, proto)?)),
                    None => (part, None),
                };
                let Some((p, t)) = ports.split_once(':') else {
                    return Err(bad(
                        "write [mode=ingress|host,]PUBLISHED:TARGET[/tcp|/udp], e.g. 8080:80",
                    ));
                };
                put(&mut published, port(spec, p)?).map_err(bad)?;
                put(&mut target, port(spec, t)?).map_err(bad)?;
                if let Some(proto) = proto {
                    put(&mut protocol, proto).map_err(bad)?;
                }
            }
        }
    }
    match (published, target) {
        (Some(published), Some(target)) => Ok(PortV1 {
            published,
            target,
            protocol: protocol.unwrap_or_default(),
            mode: mode.unwrap_or_default(),
        }),
        _ => Err(bad("both the published and the target port are needed")),
    }
}

/// Reads one `--publish-rm` value: `PUBLISHED[/tcp|/udp]` (TCP when no protocol is given).
pub fn parse_publish_rm(spec: &str) -> Result<(u16, Protocol), PublishError> {
    let (p, proto) = match spec.split_once('/') {
        Some((p, proto)) => (p, parse_protocol(spec, proto)?),
        None => (spec, Protocol::Tcp),
    };
    Ok((port(spec, p)?, proto))
}

fn port(spec: &str, text: &str) -> Result<u16, PublishError> {
    let bad = |why: &str| PublishError {
        spec: spec.to_owned(),
        why: why.to_owned(),
    };
    let text = text.trim();
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad(&format!("{text:?} is not a port number")));
    }
    match text.parse::<u64>() {
        Ok(n @ 1..=65535) => Ok(n as u16),
        _ => Err(bad("port out of range")),
    }
}

fn parse_protocol(spec: &str, text: &str) -> Result<Protocol, PublishError> {
    match text.trim().to_ascii_lowercase().as_str() {
        "tcp" => Ok(Protocol::Tcp),
        "udp" => Ok(Protocol::Udp),
        _ => Err(PublishError {
            spec: spec.to_owned(),
            why: "protocol must be tcp or udp".into(),
        }),
    }
}

impl std::fmt::Display for PortV1 {
    /// As docker's `service ls` shows it: `*:8080->80/tcp` (ingress), `8080->80/tcp` (host).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.mode == PublishMode::Ingress {
            f.write_str("*:")?;
        }
        write!(
            f,
            "{}->{}/{}",
            self.published,
            self.target,
            self.protocol.as_str()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp(published: u16, target: u16) -> PortV1 {
        PortV1 {
            published,
            target,
            protocol: Protocol::Tcp,
            mode: PublishMode::Ingress,
        }
    }

    #[test]
    fn publish_specs_read_as_docker_writes_them() {
        assert_eq!(parse_publish("8080:80"), Ok(tcp(8080, 80)));
        let udp_host = PortV1 {
            published: 53,
            target: 5353,
            protocol: Protocol::Udp,
            mode: PublishMode::Host,
        };
        assert_eq!(parse_publish("mode=host,53:5353/udp"), Ok(udp_host));
        assert_eq!(
            parse_publish("published=53,target=5353,protocol=udp,mode=host"),
            Ok(udp_host)
        );
        assert_eq!(parse_publish("mode=ingress,8080:80/TCP"), Ok(tcp(8080, 80)));
        assert_eq!(
            parse_publish("70000:80").unwrap_err().to_string(),
            r#"invalid publish spec "70000:80": port out of range"#
        );
        for bad in [
            "0:80",
            "80:0",
            "80",
            "a:80",
            "80:80/sctp",
            "mode=x,80:80",
            "8080:80,9090:90",
            "published=80",
            "size=3,80:80",
            "",
        ] {
            assert!(
                matches!(parse_publish(bad), Err(PublishError { .. })),
                "{bad}"
            );
        }
        assert_eq!(parse_publish_rm("8080"), Ok((8080, Protocol::Tcp)));
        assert_eq!(parse_publish_rm("53/udp"), Ok((53, Protocol::Udp)));
        assert!(parse_publish_rm("99999").is_err());
    }

    #[test]
    fn ports_show_as_docker_shows_them() {
        assert_eq!(tcp(8080, 80).to_string(), "*:8080->80/tcp");
        let mut udp = tcp(53, 5353);
        udp.protocol = Protocol::Udp;
        udp.mode = PublishMode::Host;
        assert_eq!(udp.to_string(), "53->5353/udp");
    }
}
