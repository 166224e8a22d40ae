//! A page of live sessions, as the console's `/sessions` lists them.
//!
//! The cost of a page is bounded by its size, never by the number of sessions or keys: live
//! sessions are read from the indexes the worker keeps (`session:starting`, `session:ready`)
//! with `SSCAN` and a cursor, one page at a time, and their records with one pipelined batch
//! of `HMGET`s. `KEYS` and `SCAN` are never used. A page holds at most [`MAX_SCANS`] `SSCAN`
//! calls and one `HMGET` per row.

use std::collections::HashSet;

use crate::connection::RedisConn;
use agent_jobs::{
    SessionId, SessionKeys,
    keys::{SESSIONS_READY, SESSIONS_STARTING},
    session_state::fields,
};

/// Rows of one page of sessions.
pub const PAGE_SIZE: usize = 50;

/// Most `SSCAN` calls one page makes (a sparse or emptied part of a set can return few ids
/// per call; the page then ends early and "next" goes on from there).
pub const MAX_SCANS: usize = 4;

/// Which sessions a page lists.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StatusFilter {
    /// Starting, then ready.
    #[default]
    Live,
    /// `session:starting` only.
    Starting,
    /// `session:ready` only.
    Ready,
}

impl StatusFilter {
    /// From the `status` query parameter (unknown values: [`StatusFilter::Live`]).
    pub fn parse(value: &str) -> Self {
        match value {
            "starting" => Self::Starting,
            "ready" => Self::Ready,
            _ => Self::Live,
        }
    }

    /// The query parameter value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Live => "live",
            Self::Starting => "starting",
            Self::Ready => "ready",
        }
    }

    /// The index sets read, in order.
    fn sets(self) -> &'static [&'static str] {
        match self {
            Self::Live => &[SESSIONS_STARTING, SESSIONS_READY],
            Self::Starting => &[SESSIONS_STARTING],
            Self::Ready => &[SESSIONS_READY],
        }
    }
}

/// Where a page of sessions starts: which of the filter's sets, the `SSCAN` cursor in it,
/// and how many ids of that cursor's batch earlier pages already showed. Shown in URLs as
/// `set.cursor.skip`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Cursor {
    set: usize,
    scan: u64,
    skip: usize,
}

impl Cursor {
    /// From the `cursor` query parameter; anything unreadable starts at the beginning.
    pub fn parse(value: &str) -> Self {
        let mut parts = value.split('.').map(str::parse::<u64>);
        match (parts.next(), parts.next(), parts.next(), parts.next()) {
            (Some(Ok(set)), Some(Ok(scan)), Some(Ok(skip)), None) if set < 2 => Self {
                set: set as usize,
                scan,
                skip: skip.min(100_000) as usize,
            },
            _ => Self::default(),
        }
    }

    /// The query parameter value.
    pub fn format(self) -> String {
        format!("{}.{}.{}", self.set, self.scan, self.skip)
    }
}

/// One session as the list shows it; every field as stored (untrusted text).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SessionRow {
    /// The session id.
    pub id: String,
    /// `status`.
    pub status: Option<String>,
    /// `voiceId`.
    pub voice: Option<String>,
    /// `userId`.
    pub user: Option<String>,
    /// `workerId`.
    pub worker: Option<String>,
    /// `createdAt` (unix seconds).
    pub created_at: Option<u64>,
    /// `startupTime` (seconds, as stored).
    pub startup_time: Option<String>,
    /// `lastActive` (unix seconds).
    pub last_active: Option<u64>,
    /// False when the index names a session whose record is gone (ended a moment ago, or a
    /// leftover the sweep will remove).
    pub has_record: bool,
}

/// One page of sessions.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SessionPage {
    /// The rows, newest first.
    pub rows: Vec<SessionRow>,
    /// Ids read from the index for this page (before the worker filter).
    pub scanned: usize,
    /// Where the next page starts; `None` at the end.
    pub next: Option<Cursor>,
}

/// The fields of `session:<id>` a row shows, in [`row_of`]'s order.
const ROW_FIELDS: [&str; 7] = [
    fields::STATUS,
    fields::VOICE_ID,
    fields::USER_ID,
    fields::WORKER_ID,
    fields::CREATED_AT,
    fields::STARTUP_TIME,
    fields::LAST_ACTIVE,
];

/// A page of at most `size` live sessions from `cursor`; with `worker`, only those whose
/// `workerId` is that worker (there is no per-worker index, so the filter applies to the rows
/// read, and a page can hold fewer than `size`).
pub async fn session_page(
    conn: &RedisConn,
    filter: StatusFilter,
    worker: Option<&str>,
    cursor: Cursor,
    size: usize,
) -> redis::RedisResult<SessionPage> {
    let mut conn = conn.clone();
    let sets = filter.sets();
    let mut ids: Vec<String> = Vec::new();
    let mut seen = HashSet::new();
    let mut at = cursor;
    let mut next = None;
    for _ in 0..MAX_SCANS {
        let Some(set) = sets.get(at.set) else { break };
        let (after, batch): (u64, Vec<String>) = redis::cmd("SSCAN")
            .arg(*set)
            .arg(at.scan)
            .arg("COUNT")
            .arg(size)
            .query_async(&mut conn)
            .await?;
        let room = size - ids.len();
        let fresh: Vec<String> = batch.into_iter().skip(at.skip).collect();
        if fresh.len() > room {
            // A small set comes back whole from one call: show part, resume inside it.
            ids.extend(fresh.into_iter().take(room));
            next = Some(Cursor {
                skip: at.skip + room,
                ..at
            });
            break;
        }
        ids.extend(fresh);
        at = if after == 0 {
            Cursor {
                set: at.set + 1,
                scan: 0,
                skip: 0,
            }
        } else {
            Cursor {
                scan: after,
                skip: 0,
                ..at
            }
        };
        next = (at.set < sets.len()).then_some(at);
        if ids.len() >= size || next.is_none() {
            break;
        }
    }
    // SSCAN may return an id twice (while the set is rehashed); and one can move from
    // starting to ready between two calls.
    ids.retain(|id| seen.insert(id.clone()));
    let scanned = ids.len();
    let records = read_rows(&mut conn, &ids).await?;
    let mut rows: Vec<SessionRow> = ids
        .into_iter()
        .zip(records)
        .map(|(id, values)| row_of(id, values))
        .filter(|row| worker.is_none_or(|w| row.worker.as_deref() == Some(w)))
        .collect();
    rows.sort_by_key(|row| std::cmp::Reverse(row.created_at));
    Ok(SessionPage {
        rows,
        scanned,
        next,
    })
}

/// The [`ROW_FIELDS`] of each of `ids`, in one pipeline of one `HMGET` per id.
async fn read_rows(
    conn: &mut RedisConn,
    ids: &[String],
) -> redis::RedisResult<Vec<Vec<Option<String>>>> {
    // Ids come from Redis, not from us: only a valid one is spliced into a key name (an
    // invalid one cannot have a record anyway, and is listed without one).
    let valid: Vec<Option<SessionId>> = ids.iter().map(|id| SessionId::parse(id).ok()).collect();
    let mut pipe = redis::pipe();
    for id in valid.iter().flatten() {
        pipe.cmd("HMGET")
            .arg(SessionKeys::new(id).state())
            .arg(&ROW_FIELDS);
    }
    let mut replies: std::vec::IntoIter<Vec<Option<String>>> = if valid.iter().any(Option::is_some)
    {
        pipe.query_async::<Vec<Vec<Option<String>>>>(conn)
            .await?
            .into_iter()
    } else {
        Vec::new().into_iter()
    };
    Ok(valid
        .iter()
        .map(|id| match id {
            Some(_) => replies.next().unwrap_or_default(),
            None => Vec::new(),
        })
        .collect())
}

fn row_of(id: String, values: Vec<Option<String>>) -> SessionRow {
    let mut values = values.into_iter();
    let mut next = || values.next().flatten();
    let status = next();
    let voice = next();
    let user = next();
    let worker = next();
    let created_at = next().and_then(|t| t.parse().ok());
    let startup_time = next();
    let last_active = next().and_then(|t| t.parse().ok());
    SessionRow {
        has_record: status.is_some() || worker.is_some(),
        id,
        status,
        voice,
        user,
        worker,
        created_at,
        startup_time,
        last_active,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_junk_starts_over() {
        let c = Cursor {
            set: 1,
            scan: 1234,
            skip: 7,
        };
        assert_eq!(Cursor::parse(&c.format()), c);
        for junk in ["", "x", "1.2", "9.0.0", "1.2.3.4", "-1.0.0"] {
            assert_eq!(Cursor::parse(junk), Cursor::default(), "{junk}");
        }
        assert_eq!(StatusFilter::parse("ready"), StatusFilter::Ready);
        assert_eq!(StatusFilter::parse("<x>"), StatusFilter::Live);
    }
}
