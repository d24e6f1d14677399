//! `shoal-cni`'s decisions on whatever a runtime (or anyone) passes: the first byte picks
//! `CNI_COMMAND` and which variables are set, the rest is the configuration on stdin. The
//! plugin must never panic; what it prints is one JSON document; a call it makes to the agent
//! carries a JSON object as its configuration.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shoal_cni::{plan, Env, Plan};

const COMMANDS: [&str; 8] = ["ADD", "DEL", "CHECK", "GC", "STATUS", "VERSION", "add", ""];

fuzz_target!(|data: &[u8]| {
    let (head, stdin) = data.split_at(data.len().min(1));
    let pick = head.first().copied().unwrap_or(0);
    let command = COMMANDS[usize::from(pick) % COMMANDS.len()];
    let with_ids = pick & 0x08 == 0;
    let env = Env::from_lookup(&|name| match name {
        "CNI_COMMAND" => Some(command.to_owned()),
        "CNI_CONTAINERID" if with_ids => Some("c0ffee".to_owned()),
        "CNI_IFNAME" if with_ids => Some("eth0".to_owned()),
        "CNI_NETNS" if pick & 0x10 == 0 => Some("/run/netns/x".to_owned()),
        "CNI_ARGS" if pick & 0x20 == 0 => Some("IP=10.0.0.5".to_owned()),
        _ => None,
    });
    match plan(&env, Ok(stdin)) {
        Plan::Done(out) => {
            if let Some(text) = out.stdout {
                assert!(serde_json::from_str::<serde_json::Value>(&text).is_ok(), "{text}");
            }
        }
        Plan::Call(call) => {
            assert!(call.request.config.is_object());
            let json = serde_json::to_string(&shoal_proto::api::Request::Cni(call.request))
                .expect("a request always encodes");
            assert!(!json.is_empty());
        }
    }
});
