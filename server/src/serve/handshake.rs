//! Connections that open with the peers' preface: told apart from HTTP by reading their first
//! bytes (no polling), then taken through the cluster secret's exchange outside the client
//! connections' cap, in a small pool of their own with a short timeout.
//!
//! Until the preface has fully arrived a connection is an ordinary client connection, idle
//! and evictable like one still sending its headers. Once it has, it leaves the clients' cap:
//! a handshake, unauthenticated, waits in the pool ([`MAX_PEER_HANDSHAKES`]; a new one evicts
//! the oldest, so a flood cannot keep a real peer out for long: it finishes in one round trip
//! and its dialer retries) for at most [`PEER_HANDSHAKE_TIMEOUT`]. A peer that sent the
//! secret is served the peers' protocol, bounded by its own silence timeout.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use super::{Registered, Registry};
use crate::cluster::{Inbound, PREFACE};

/// Peer handshakes (preface received, secret not yet checked) open at once, at most.
pub const MAX_PEER_HANDSHAKES: usize = 32;

/// How long a peer has, from its preface, to send the cluster secret. A dialing peer gives
/// the whole connection and exchange half a second.
pub const PEER_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(1);

/// What a connection's first bytes are.
pub(super) enum Sniffed {
    /// The peers' preface, read.
    Peer,
    /// Anything else: the bytes read so far (a prefix of a request head, or nothing if the
    /// connection ended), to hand to HTTP before the rest.
    Other(Vec<u8>),
}

/// Reads the connection's first bytes until they are the preface or differ from it. Each read
/// waits for bytes to arrive: a client sending a byte at a time costs a wake-up per byte.
pub(super) async fn sniff(stream: &mut TcpStream) -> io::Result<Sniffed> {
    let mut first = [0u8; PREFACE.len()];
    let mut read = 0;
    loop {
        let more = stream.read(&mut first[read..]).await?;
        if more == 0 {
            return Ok(Sniffed::Other(first[..read].to_vec()));
        }
        read += more;
        if first[..read] != PREFACE[..read] {
            return Ok(Sniffed::Other(first[..read].to_vec()));
        }
        if read == PREFACE.len() {
            return Ok(Sniffed::Peer);
        }
    }
}

/// The peer handshakes in progress.
pub(super) struct Handshakes {
    registry: Arc<Registry>,
}

impl Handshakes {
    pub fn new() -> Self {
        Self {
            registry: Arc::new(Registry::new()),
        }
    }

    /// Takes a connection that sent the preface through the secret's exchange, in the pool
    /// (evicting the oldest handshake if it is full) and within [`PEER_HANDSHAKE_TIMEOUT`];
    /// then serves the peer, if welcomed, until it ends or the drain has run its commands.
    pub async fn serve(
        &self,
        id: u64,
        mut stream: TcpStream,
        peers: Inbound,
        drain: CancellationToken,
    ) {
        while self.registry.len() >= MAX_PEER_HANDSHAKES {
            if !self.registry.evict_idlest() {
                break;
            }
        }
        let tracked = self.registry.insert(id);
        let registered = Registered {
            registry: Arc::clone(&self.registry),
            id,
        };
        let welcomed = tokio::select! {
            biased;
            () = tracked.evict.cancelled() => false,
            () = drain.cancelled() => false,
            welcomed = tokio::time::timeout(PEER_HANDSHAKE_TIMEOUT, peers.welcome(&mut stream)) => {
                welcomed.unwrap_or(false)
            }
        };
        drop(registered);
        if welcomed {
            peers.serve(stream, drain).await;
        }
    }
}
