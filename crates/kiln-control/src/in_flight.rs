//! The sandbox a request works on. Another request (a pause, a fork, a destroy), its time to
//! live or its VMM's end can change a sandbox while a call to its agent is under way; the
//! call then loses its connection. Such a call is answered with what happened to the
//! sandbox (404 when it was destroyed, 409 when it was paused or failed), the answer a new
//! call would get, not with a 503 that says "try again".
//!
//! [`scope`] runs a request with room for the sandbox; [`Control::live`] notes the sandbox in
//! it; converting a lost connection into a [`ControlError`] reads it. Outside a scope nothing
//! is noted and a lost connection is a 503 as before.
//!
//! [`Control::live`]: crate::Control

use std::cell::RefCell;
use std::future::Future;
use std::sync::Arc;

use kiln_engine::{Sandbox, SandboxState};

use crate::ControlError;

tokio::task_local! {
    static SANDBOX: RefCell<Option<Arc<Sandbox>>>;
}

/// Runs `request` with room for the sandbox it works on.
pub async fn scope<F: Future>(request: F) -> F::Output {
    SANDBOX.scope(RefCell::new(None), request).await
}

/// Notes `sandbox` as the one the current request works on.
pub(crate) fn note(sandbox: &Arc<Sandbox>) {
    let _ = SANDBOX.try_with(|cell| *cell.borrow_mut() = Some(sandbox.clone()));
}

/// What a lost connection to the noted sandbox's agent means, if the sandbox no longer runs.
pub(crate) fn changed_under_call() -> Option<ControlError> {
    SANDBOX
        .try_with(|cell| {
            let noted = cell.borrow();
            let sandbox = noted.as_ref()?;
            explain(sandbox.id(), &sandbox.state())
        })
        .ok()
        .flatten()
}

fn explain(id: &str, state: &SandboxState) -> Option<ControlError> {
    match state {
        SandboxState::Running => None,
        SandboxState::Destroyed => Some(ControlError::Missing(format!(
            "sandbox `{id}` was destroyed while the call ran"
        ))),
        SandboxState::Failed { reason } => Some(ControlError::Conflict(format!(
            "sandbox `{id}` failed while the call ran: {reason}"
        ))),
        other => Some(ControlError::Conflict(format!(
            "sandbox `{id}` is {} (it was paused while the call ran): call again once it runs",
            other.name()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_running_sandbox_explains_nothing() {
        assert!(explain("sb-1", &SandboxState::Running).is_none());
    }

    #[test]
    fn other_states_are_not_found_or_conflicts() {
        assert!(matches!(
            explain("sb-1", &SandboxState::Destroyed),
            Some(ControlError::Missing(m)) if m.contains("destroyed while the call ran")
        ));
        assert!(matches!(
            explain("sb-1", &SandboxState::Paused),
            Some(ControlError::Conflict(m)) if m.contains("paused")
        ));
        assert!(matches!(
            explain("sb-1", &SandboxState::Failed { reason: "VMM ended".into() }),
            Some(ControlError::Conflict(m)) if m.contains("VMM ended")
        ));
    }

    #[tokio::test]
    async fn outside_a_scope_nothing_is_noted() {
        assert!(changed_under_call().is_none());
        scope(async { assert!(changed_under_call().is_none()) }).await;
    }
}
