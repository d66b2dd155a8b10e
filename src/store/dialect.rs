//! How the SQL of the backends differs, so that each query is written once (in `queries`) and
//! rendered per dialect when a store connects.
//!
//! The queries are written with `?` placeholders, in the order their parameters are bound.
//! What differs: numbered placeholders (`$1`); how lists and rows travel (one parameter per
//! value in multi-row `VALUES`, or one array per column through `unnest`); whose clock leases
//! are measured on; how a flush locks the rows it reads; which statements open transactions.

use std::sync::Arc;

use sqlx::{AssertSqlSafe, SqlSafeStr, SqlStr};

use super::rows::{SqlType, names};

/// What a backend's SQL looks like, where the backends differ.
#[derive(Debug)]
pub(crate) struct Dialect {
    /// Placeholders are `$1`, `$2`, ... instead of `?`.
    pub numbered: bool,
    /// How lists and rows of values are bound.
    pub batch: Batch,
    /// The database's clock in microseconds, as SQL. `None`: this machine's clock, bound as a
    /// parameter where a query reads the time.
    pub clock: Option<&'static str>,
    /// Ends the queries that read rows a flush writes (or waits for): what locks them until
    /// the commit, where the transaction does not hold the lock from its start.
    pub lock: &'static str,
    /// Opens a flush's transaction.
    pub begin_write: &'static str,
    /// Opens a read transaction that sees one snapshot.
    pub begin_snapshot: &'static str,
    /// The column that addresses a row where it is stored (for deleting rows a few at a time).
    pub row_address: &'static str,
}

/// How a statement carries many rows or list items.
#[derive(Debug)]
// A build with one backend uses one way only.
#[cfg_attr(not(all(feature = "sqlite", feature = "postgres")), allow(dead_code))]
pub(crate) enum Batch {
    /// One parameter per value: rows in a multi-row `VALUES`, lists in `IN (...)`. A statement
    /// carries at most `max` (a power of two) rows or items; see [`statement_chunks`].
    Values { max: usize },
    /// One array parameter per column: rows through `unnest`, lists through `= ANY(...)`, all
    /// in one statement whatever their number. `array_type` names the array type of a column.
    Arrays {
        array_type: fn(SqlType) -> &'static str,
    },
}

/// A statement that carries rows or a list, rendered for each number of them it may be sent
/// with: one text per power of two up to the maximum with `VALUES`, one text with arrays.
#[derive(Debug)]
pub(crate) struct Batched(Vec<SqlStr>);

impl Batched {
    /// The text for a chunk of `count` rows or items (a list is padded up to a power of two).
    pub fn get(&self, count: usize) -> SqlStr {
        let index = count.max(1).next_power_of_two().ilog2() as usize;
        let text = self.0.get(index).or(self.0.last());
        // Never empty: rendering made one text at least.
        text.cloned().unwrap_or_else(|| SqlStr::from_static(""))
    }
}

impl Dialect {
    /// Renders a statement: its `?` placeholders numbered where the dialect wants that. The
    /// text is shared, so that handing it to a query costs no copy.
    pub fn render(&self, sql: &str) -> SqlStr {
        if !self.numbered {
            return AssertSqlSafe(Arc::<str>::from(sql)).into_sql_str();
        }
        let mut numbered = String::with_capacity(sql.len() + 16);
        for (index, part) in sql.split('?').enumerate() {
            // The text before the first `?` gets no number; the one after the n-th gets `$n`.
            if index > 0 {
                numbered.push('$');
                numbered.push_str(&index.to_string());
            }
            numbered.push_str(part);
        }
        AssertSqlSafe(Arc::<str>::from(numbered)).into_sql_str()
    }

    /// Renders a statement that carries rows or a list, for each number of them it may carry:
    /// `sql` writes it for `count` of them.
    pub fn render_batched(&self, sql: impl Fn(usize) -> String) -> Batched {
        match self.batch {
            Batch::Values { max } => Batched(
                (0..=max.ilog2())
                    .map(|power| self.render(&sql(1 << power)))
                    .collect(),
            ),
            Batch::Arrays { .. } => Batched(vec![self.render(&sql(1))]),
        }
    }

    /// `count` rows of `columns` as a query's source: `VALUES (?, ?), (?, ?)` or
    /// `SELECT * FROM unnest(?::uuid[], ?::int8[])`.
    pub fn rows(&self, columns: &[(&str, SqlType)], count: usize) -> String {
        match self.batch {
            Batch::Values { .. } => {
                let row = format!("({})", vec!["?"; columns.len()].join(", "));
                format!("VALUES {}", vec![row; count].join(", "))
            }
            Batch::Arrays { array_type } => {
                let arrays: Vec<String> = columns
                    .iter()
                    .map(|&(_, sql_type)| format!("?::{}", array_type(sql_type)))
                    .collect();
                format!("SELECT * FROM unnest({})", arrays.join(", "))
            }
        }
    }

    /// A common table expression named `name` over `count` rows of `columns`:
    /// `name(a, b) AS (VALUES ...)`, or `name AS (SELECT * FROM unnest(...) AS name(a, b))`.
    pub fn table(&self, name: &str, columns: &[(&str, SqlType)], count: usize) -> String {
        let rows = self.rows(columns, count);
        match self.batch {
            Batch::Values { .. } => format!("{name}({}) AS ({rows})", names(columns)),
            Batch::Arrays { .. } => format!("{name} AS ({rows} AS {name}({}))", names(columns)),
        }
    }

    /// A test that a value is in a list of `count` items: `IN (?, ?)` or `= ANY(?)`.
    pub fn in_list(&self, count: usize) -> String {
        match self.batch {
            Batch::Values { .. } => format!("IN ({})", vec!["?"; count].join(", ")),
            Batch::Arrays { .. } => "= ANY(?)".to_owned(),
        }
    }

    /// The current time in microseconds, as SQL: the database's clock, or a parameter.
    pub fn now(&self) -> &'static str {
        self.clock.unwrap_or("?")
    }

    /// Splits rows into the chunks that one statement each carries: power-of-two chunks with
    /// `VALUES`, all at once with arrays.
    pub fn row_chunks<'a, T>(&self, rows: &'a [T]) -> Vec<&'a [T]> {
        match self.batch {
            Batch::Values { max } => statement_chunks(rows, max).collect(),
            Batch::Arrays { .. } => (!rows.is_empty()).then_some(rows).into_iter().collect(),
        }
    }

    /// Splits a list into the chunks that one statement each carries: at most the maximum
    /// with `VALUES` (each padded to a power of two when bound), all at once with arrays.
    pub fn list_chunks<'a, T>(&self, items: &'a [T]) -> Vec<&'a [T]> {
        match self.batch {
            Batch::Values { max } => items.chunks(max).collect(),
            Batch::Arrays { .. } => (!items.is_empty()).then_some(items).into_iter().collect(),
        }
    }
}

/// Splits `items` into chunks whose lengths are powers of two (largest first, at most `max`).
/// A multi-row statement's text depends on its row count, and SQLite prepares each distinct
/// text anew; with power-of-two chunks the few shapes there are stay in the connection's
/// statement cache, so a flush of any size reuses prepared statements.
pub(crate) fn statement_chunks<T>(items: &[T], max: usize) -> impl Iterator<Item = &[T]> {
    let mut rest = items;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let size = max.min(1 << rest.len().ilog2());
        let (chunk, tail) = rest.split_at(size);
        rest = tail;
        Some(chunk)
    })
}

#[cfg(test)]
mod tests {
    use super::statement_chunks;

    #[test]
    fn chunks_are_powers_of_two_and_cover_everything() {
        const MAX: usize = 256;
        for count in [0usize, 1, 2, 3, 7, 64, 255, 256, 257, 509, 1000] {
            let items: Vec<usize> = (0..count).collect();
            let chunks: Vec<&[usize]> = statement_chunks(&items, MAX).collect();
            assert!(chunks.iter().all(|chunk| chunk.len().is_power_of_two()));
            assert!(chunks.iter().all(|chunk| chunk.len() <= MAX));
            let joined: Vec<usize> = chunks.concat();
            assert_eq!(joined, items, "{count} items");
        }
        let items = vec![0; 509];
        let sizes: Vec<usize> = statement_chunks(&items, MAX).map(<[usize]>::len).collect();
        assert_eq!(sizes, vec![256, 128, 64, 32, 16, 8, 4, 1]);
    }
}
