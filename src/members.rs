//! Membership: the processes that share a database register themselves in it (id, the address
//! their peers reach them at, a heartbeat), so that each can find the others with nothing but
//! the database URL. A member renews its heartbeat three times per member lease and removes its
//! row when it shuts down; one that stops renewing (killed, cut off) drops out of
//! [`Engine::members`](crate::Engine::members) once its lease runs out.

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};
use uuid::Uuid;

use crate::store::Store;

/// Renews this process's membership every third of `lease` until `stop`. A renewal that fails
/// (the database unreachable) is retried on the next beat; the row's address is rewritten each
/// time, so a row removed meanwhile comes back.
pub(crate) async fn heartbeat(
    store: Store,
    id: Uuid,
    address: String,
    lease: Duration,
    stop: CancellationToken,
) {
    let period = (lease / 3).max(Duration::from_millis(10));
    let mut failures = 0u32;
    loop {
        tokio::select! {
            () = tokio::time::sleep(period) => {}
            () = stop.cancelled() => return,
        }
        match store.join_member(id, &address).await {
            Ok(()) => failures = 0,
            Err(error) => {
                failures += 1;
                // Once per lease missed is enough to tell an operator; the rest is noise.
                if failures % 3 == 1 {
                    warn!(%error, failures, "could not renew this process's membership");
                } else {
                    debug!(%error, failures, "could not renew this process's membership");
                }
            }
        }
    }
}
