//! What a SQL backend supplies to the shared code ([`Backend`]), and how the shared code binds
//! a statement's parameters through it ([`Params`]).

use sqlx::error::BoxDynError;
use sqlx::{Arguments, Database, Encode, Type};

use super::dialect::{Batch, Dialect};
use super::rows::WriteRow;
use crate::error::StorageError;

/// What a SQL backend does its own way, implemented by its sqlx driver type.
pub(crate) trait Backend: Database {
    /// How the backend's SQL differs from the others'.
    const DIALECT: Dialect;

    /// Binds `rows` (or the items of a list) where the dialect rendered them: their values
    /// one by one, or each column as an array.
    fn bind_rows<R: WriteRow>(args: &mut Self::Arguments, rows: &[R]) -> Result<(), BoxDynError>;

    /// How many rows a statement changed.
    fn rows_affected(result: &Self::QueryResult) -> u64;

    /// Whether a failed flush may be retried as is: the database refused it before anything
    /// could have committed.
    fn is_transient(error: &StorageError) -> bool;

    /// Whether the database refused a statement for what it carried (a value it cannot
    /// store, a constraint, a trigger's refusal): the transaction stopped before its commit,
    /// and the same write would be refused again. Never a lost connection, whose outcome may
    /// be unknown.
    fn is_refused(error: &StorageError) -> bool;
}

/// A statement's parameters, added in the order of its placeholders. The first value that
/// cannot be encoded is reported by [`Params::finish`].
pub(crate) struct Params<DB: Database>(Result<DB::Arguments, BoxDynError>);

impl<DB: Backend> Params<DB> {
    /// No parameters yet.
    pub fn new() -> Self {
        Self(Ok(DB::Arguments::default()))
    }

    /// Binds with `bind`, unless an earlier value failed.
    fn with(mut self, bind: impl FnOnce(&mut DB::Arguments) -> Result<(), BoxDynError>) -> Self {
        if let Ok(args) = &mut self.0 {
            if let Err(error) = bind(args) {
                self.0 = Err(error);
            }
        }
        self
    }

    /// Adds one value.
    pub fn add<T>(self, value: T) -> Self
    where
        T: for<'q> Encode<'q, DB> + Type<DB>,
    {
        self.with(|args| args.add(value))
    }

    /// Adds the current time where the dialect reads it from a parameter (this machine's
    /// clock); a dialect that uses the database's clock has no placeholder for it.
    pub fn now(self, now: i64) -> Self
    where
        i64: for<'q> Encode<'q, DB> + Type<DB>,
    {
        match DB::DIALECT.clock {
            Some(_) => self,
            None => self.add(now),
        }
    }

    /// Adds rows, as one chunk of the dialect's [`Dialect::row_chunks`].
    pub fn rows<R: WriteRow>(self, rows: &[R]) -> Self {
        self.with(|args| DB::bind_rows(args, rows))
    }

    /// Adds the items of a list, as one chunk of the dialect's [`Dialect::list_chunks`]: with
    /// `VALUES`, padded to a power of two by repeating the last (which changes nothing for
    /// `IN`), so that the statement's text is one of the few rendered.
    pub fn list<R: WriteRow>(self, items: &[R]) -> Self {
        self.with(|args| {
            DB::bind_rows(args, items)?;
            if let (Batch::Values { .. }, Some(last)) = (&DB::DIALECT.batch, items.last()) {
                for _ in items.len()..items.len().next_power_of_two() {
                    DB::bind_rows(args, std::slice::from_ref(last))?;
                }
            }
            Ok(())
        })
    }

    /// The arguments, or the error of the first value that could not be bound.
    pub fn finish(self) -> Result<DB::Arguments, StorageError> {
        self.0
            .map_err(|error| StorageError::from(sqlx::Error::Encode(error)))
    }
}
