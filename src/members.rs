//! Membership: the processes that share a database register themselves in it (id, the address
//! their peers reach them at, a heartbeat), so that each can find the others with nothing but
//! the database URL. A member renews its heartbeat three times per member lease and removes its
//! row when it shuts down; one that stops renewing (killed, cut off) drops out of
//! [`Engine::members`](crate::Engine::members) once its lease runs out.

use std::sync::Arc;
use std::time::Duration;

use soloist_actors::Registry;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use uuid::Uuid;

use crate::cluster::Directory;
use crate::error::StorageError;
use crate::session::SessionActor;
use crate::store::Store;

/// Reads the live members into `directory`'s view.
pub(crate) async fn refresh(
    store: &Store,
    directory: &Directory,
    lease: Duration,
) -> Result<(), StorageError> {
    let lease = i64::try_from(lease.as_micros()).unwrap_or(i64::MAX);
    let members = store.live_members(lease).await?;
    if directory.update(members) {
        info!(
            members = directory.members().len(),
            "the cluster's membership changed"
        );
    }
    Ok(())
}

/// Renews this process's membership every third of `lease` until `stop`, and reads the live
/// members into `directory` each time. A renewal that fails (the database unreachable) is
/// retried on the next beat; the row's address is rewritten each time, so a row removed
/// meanwhile comes back.
pub(crate) async fn heartbeat(
    store: Store,
    id: Uuid,
    address: String,
    lease: Duration,
    directory: Arc<Directory>,
    stop: CancellationToken,
) {
    let period = (lease / 3).max(Duration::from_millis(10));
    let mut failures = 0u32;
    loop {
        tokio::select! {
            () = tokio::time::sleep(period) => {}
            () = stop.cancelled() => return,
        }
        let beat = async {
            store.join_member(id, &address).await?;
            refresh(&store, &directory, lease).await
        };
        match beat.await {
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

/// Hands over the sessions this process stops owning when its view of the members changes (a
/// member joined, or one left or became unreachable): each live one it owned by the previous
/// view and does not by the new is passivated, finishing the batch in hand, so that the new
/// owner's first write claims it cleanly. Sessions that are live here only for reads are left
/// alone. Also checked every third of `lease`, for suspects that come back.
pub(crate) async fn hand_over(
    registry: Registry<SessionActor>,
    directory: Arc<Directory>,
    lease: Duration,
    stop: CancellationToken,
) {
    let period = (lease / 3).max(Duration::from_millis(10));
    let mut changes = directory.subscribe();
    let mut before = directory.placing();
    loop {
        tokio::select! {
            changed = changes.changed() => if changed.is_err() { return },
            () = tokio::time::sleep(period) => {}
            () = stop.cancelled() => return,
        }
        let after = directory.placing();
        let mut moved = 0usize;
        for session in registry.live_keys() {
            if before.owns(session) && !after.owns(session) {
                registry.passivate(&session);
                moved += 1;
            }
        }
        if moved > 0 {
            info!(
                sessions = moved,
                "handing sessions over to their new owners"
            );
        }
        before = after;
    }
}
