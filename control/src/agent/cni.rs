//! The agent's side of `shoal-cni` (CNI spec 1.1.0): attachments of containers to user
//! networks. See `docs/networks.md`.

use crate::api::{CniAnswer, CniError, CniRequest};

use super::Agent;

impl Agent {
    /// Carries out one plugin call.
    pub(crate) async fn cni(&self, req: CniRequest) -> CniAnswer {
        let _ = req;
        CniAnswer::Failed(CniError::new(
            50,
            "user networks are not served by this agent yet",
        ))
    }
}
