//! A small keyed-actor runtime: one tokio task per live key, activated on demand.
//!
//! A [`Registry`] maps keys to actors. The first message for a key activates its actor
//! ([`Actor::activate`]); the actor then handles its bounded mailbox in batches
//! ([`Actor::handle`]), passivates when idle, when asked, when evicted to respect a cap on live
//! actors, or at shutdown ([`Actor::stop`]), and is rebuilt in place if a batch panics.
//!
//! # Guarantees
//! - **One live actor per key.** A new activation for a key starts only after the previous one
//!   has drained its mailbox and returned from `stop`, so two activated actors for one key never
//!   exist in one registry.
//! - **No silent loss.** A message accepted by [`Registry::send`] is handled by the actor that
//!   owned the mailbox, or re-delivered through the registry to the next activation when the
//!   mailbox was already closing. Messages lost to a panic drop their reply senders, so an
//!   [`Registry::ask`] gets [`AskError::ActorFailed`] rather than hanging.
//! - **Order.** Messages sent one after another by one caller for one key are handled in that
//!   order, across passivations and re-activations.
//! - **Graceful drain.** [`Registry::shutdown`] refuses new messages, lets every actor handle what
//!   was already queued, calls `stop`, and resolves once every actor task has ended.
//!
//! # Layout
//! - `actor`: the [`Actor`] trait, and the task that runs one activation (batching, idle
//!   passivation, supervision, drain).
//! - `registry`: [`Registry`] and [`RegistryConfig`]: the key → mailbox map, activation,
//!   sending, LRU eviction and shutdown.
//! - `error`: [`SendError`] and [`AskError`].
//! - `stats`: [`RegistryStats`] and the counters behind it.
//! - `rt`: the task, lock, yield and time primitives, from tokio, or from shuttle when the crate
//!   is compiled for the schedule-exploring tests in `shuttle/`.

mod actor;
mod error;
mod registry;
mod rt;
mod stats;

pub use actor::Actor;
pub use error::{AskError, SendError};
pub use registry::{Registry, RegistryConfig};
pub use stats::RegistryStats;

// Only in the `soloist-actors-shuttle` package, which compiles this crate with `cfg(shuttle)`.
#[cfg(all(shuttle, test))]
#[path = "../shuttle/schedules.rs"]
mod schedules;
