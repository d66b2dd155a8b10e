//! Exact retries of the commands that carry no message ids (create, update, usage, delete).
//!
//! A command may carry an idempotency key. The first command with a key on a session stores,
//! in the same transaction as its effect, the key, a fingerprint of the command and the answer
//! it got; a later command with that key on that session applies nothing and gets the stored
//! answer (or [`Error::IdempotencyKeyReused`] if its fingerprint differs). Records live
//! in the database, so a retry is exact across restarts and processes, for
//! [`EngineConfig::idempotency_retention`](crate::EngineConfig::idempotency_retention).
//! Across processes the table's primary key `(session_id, key)` catches two processes racing
//! with the same key: the loser's flush conflicts, reloads, finds the record and replays it.

use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};
use uuid::Uuid;

use crate::command::Command;
use crate::error::{Error, Result};
use crate::model::{SessionId, now_micros};
use crate::store::Store;

/// Records deleted per statement by the purge, so that it never holds the writer long.
const PURGE_BATCH: i64 = 1000;

/// The longest idempotency key, in bytes.
pub const MAX_KEY_BYTES: usize = 255;

/// A key with the fingerprint of the command that carries it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Keyed {
    pub key: String,
    pub fingerprint: Vec<u8>,
}

impl Keyed {
    /// The key of `command` (if it has one) with the command's fingerprint. The fingerprint
    /// covers every field of the command but the key itself, the caller included.
    pub fn of(key: Option<&str>, command: &Command) -> Option<Self> {
        key.map(|key| Keyed {
            key: key.to_owned(),
            fingerprint: fingerprint(command),
        })
    }
}

/// A stored record of a keyed command.
#[derive(Clone, Debug)]
pub(crate) struct KeyRecord {
    /// Who sent the command: a record answers only its own user.
    pub user_id: String,
    pub fingerprint: Vec<u8>,
    /// The answer, as a JSON [`Reply`](crate::Reply).
    pub response: String,
    /// When it was stored (microseconds): past the retention it no longer counts.
    pub created_at: i64,
}

/// Idempotency keys are 1 to 255 bytes of visible ASCII.
pub(crate) fn check_key(key: &str) -> Result<()> {
    if key.is_empty()
        || key.len() > MAX_KEY_BYTES
        || !key.bytes().all(|byte| byte.is_ascii_graphic())
    {
        return Err(Error::invalid(
            "idempotency_key",
            "must be 1 to 255 characters of visible ASCII",
        ));
    }
    Ok(())
}

/// SHA-256 of the command as JSON (its key cleared by the caller). JSON fields are hashed as
/// the text they were sent as, so a resend of the same request has the same fingerprint.
fn fingerprint(command: &Command) -> Vec<u8> {
    // Plain data always serializes; an empty fingerprint would only ever match itself.
    let bytes = serde_json::to_vec(command).unwrap_or_default();
    Sha256::digest(&bytes).to_vec()
}

/// Derives the session ids of creates that carry an idempotency key and no id, so that every
/// retry of the create reaches the same session (and its record), through any process.
///
/// Derived with a secret kept in the database (every process sharing it derives the same
/// ids), so that no client can compute another user's id in advance and take it first. An id
/// carries its own check: 64 bits derived from the user and the key, then a tag derived from
/// the user and those bits (a UUIDv8 keeps 58 of them), so the engine can tell whether it
/// could have issued an id to a user without knowing the key (an import may only create a
/// keyed id of its own user's).
#[derive(Clone)]
pub(crate) struct CreateIds {
    secret: std::sync::Arc<[u8]>,
}

impl std::fmt::Debug for CreateIds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CreateIds(<secret>)")
    }
}

impl CreateIds {
    /// Ids derived with `secret`.
    pub fn new(secret: &str) -> Self {
        Self {
            secret: secret.as_bytes().into(),
        }
    }

    /// The id of `user_id`'s create with idempotency key `key`.
    pub fn derive(&self, user_id: &str, key: &str) -> SessionId {
        let mut head = [0u8; 8];
        head.copy_from_slice(&self.mac(b"create", user_id, key.as_bytes())[..8]);
        // The version's bits, as the UUID will carry them, so the tag can be checked.
        head[6] = (head[6] & 0x0f) | 0x80;
        self.with_tag(user_id, head)
    }

    /// Whether `id` is one [`Self::derive`] gives `user_id` for some key.
    pub fn issued_to(&self, user_id: &str, id: SessionId) -> bool {
        let uuid = id.as_uuid();
        if uuid.get_version_num() != 8 {
            return false;
        }
        let mut head = [0u8; 8];
        head.copy_from_slice(&uuid.as_bytes()[..8]);
        self.with_tag(user_id, head) == id
    }

    fn with_tag(&self, user_id: &str, head: [u8; 8]) -> SessionId {
        let mut bytes = [0u8; 16];
        bytes[..8].copy_from_slice(&head);
        bytes[8..].copy_from_slice(&self.mac(b"tag", user_id, &head)[..8]);
        SessionId::from_uuid(Uuid::new_v8(bytes))
    }

    /// HMAC-SHA-256 of `purpose`, the user (its length first, so no two users' inputs run
    /// into each other) and `data`.
    fn mac(&self, purpose: &[u8], user_id: &str, data: &[u8]) -> [u8; 32] {
        use hmac::{KeyInit, Mac};
        // HMAC takes a key of any length.
        let Ok(mut mac) = hmac::Hmac::<Sha256>::new_from_slice(&self.secret) else {
            return [0; 32];
        };
        mac.update(purpose);
        mac.update(&[0]);
        mac.update(&(user_id.len() as u64).to_be_bytes());
        mac.update(user_id.as_bytes());
        mac.update(data);
        mac.finalize().into_bytes().into()
    }
}

/// Deletes expired records of every session, a bounded batch at a time: sessions that store
/// keys clean their own as they go, this catches the ones never written again. Runs every
/// quarter of the retention (at most hourly) until `stop`.
pub(crate) async fn purge_expired(store: Store, retention: Duration, stop: CancellationToken) {
    let period = (retention / 4).clamp(Duration::from_millis(100), Duration::from_secs(3600));
    let retention = i64::try_from(retention.as_micros()).unwrap_or(i64::MAX);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(period) => {}
        }
        let cutoff = now_micros().saturating_sub(retention);
        let mut purged = 0;
        loop {
            match store.purge_keys(cutoff, PURGE_BATCH).await {
                Ok(count) => {
                    purged += count;
                    if count < PURGE_BATCH as u64 {
                        break;
                    }
                    // Let the flushes queued behind this batch go first.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Err(error) => {
                    warn!(%error, "purging expired idempotency records failed; retrying later");
                    break;
                }
            }
        }
        if purged > 0 {
            debug!(purged, "expired idempotency records deleted");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_ids_depend_on_the_secret_user_and_key() {
        let ids = CreateIds::new("secret one");
        let a = ids.derive("alice", "k1");
        assert_eq!(a, ids.derive("alice", "k1"));
        assert_ne!(a, ids.derive("alice", "k2"));
        assert_ne!(a, ids.derive("bob", "k1"));
        // The length prefix keeps ("a", "bc") and ("ab", "c") apart.
        assert_ne!(ids.derive("a", "bc"), ids.derive("ab", "c"));
        assert_ne!(a, CreateIds::new("secret two").derive("alice", "k1"));
        assert_eq!(a.as_uuid().get_version_num(), 8);
    }

    #[test]
    fn an_id_tells_whom_it_was_issued_to() {
        let ids = CreateIds::new("hunter2");
        let a = ids.derive("alice", "new-chat-1");
        assert!(ids.issued_to("alice", a));
        assert!(!ids.issued_to("bob", a));
        assert!(!CreateIds::new("other").issued_to("alice", a));
        assert!(!ids.issued_to("alice", SessionId::new()));
        // Any other bit changed: not issued.
        let mut bytes = *a.as_uuid().as_bytes();
        bytes[15] ^= 1;
        assert!(!ids.issued_to("alice", SessionId::from_uuid(Uuid::from_bytes(bytes))));
        assert!(!format!("{ids:?}").contains("hunter2"));
    }

    #[test]
    fn keys_are_visible_ascii() {
        assert!(check_key("retry-7f3a").is_ok());
        assert!(check_key("").is_err());
        assert!(check_key("has space").is_err());
        assert!(check_key(&"k".repeat(256)).is_err());
        assert!(check_key(&"k".repeat(255)).is_ok());
    }
}
