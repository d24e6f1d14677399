//! Control messages (local API, manager API) and state-machine commands from untrusted
//! bytes: decoding never panics, what decodes re-encodes to an equal value, and applying any
//! decoded command list to a state never panics and keeps the version count honest.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shoal_control::api::{ManagerRequest, ManagerResponse, Request, Response};
use shoal_control::manager::state::{Applied, Command, State};

fn round_trip<T>(data: &[u8])
where
    T: serde::de::DeserializeOwned + serde::Serialize + PartialEq + std::fmt::Debug,
{
    if let Ok(value) = serde_json::from_slice::<T>(data) {
        let bytes = serde_json::to_vec(&value).expect("encode");
        let back: T = serde_json::from_slice(&bytes).expect("decode what we encoded");
        assert_eq!(back, value);
    }
}

fuzz_target!(|data: &[u8]| {
    round_trip::<Request>(data);
    round_trip::<Response>(data);
    round_trip::<ManagerRequest>(data);
    round_trip::<ManagerResponse>(data);
    if let Ok(commands) = serde_json::from_slice::<Vec<Command>>(data) {
        let mut state = State::default();
        for command in commands {
            let before = state.clone();
            match state.apply(command) {
                Ok(Applied::Changed) => assert_eq!(state.version, before.version + 1),
                Ok(Applied::Unchanged) | Err(_) => assert_eq!(state, before),
            }
        }
    }
});
