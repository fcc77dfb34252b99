//! When a committed transaction's messages may be deleted from SQS: the rule of `sqs_ingest.delete_after`.
//!
//! A message deleted from SQS exists only in the database, so it may be deleted only once the commit that stored it
//! (or dead-lettered, filtered or recognised it as a duplicate) survives what the deployment relies on. The commit
//! is always flushed to the local WAL first (the extension forces it, whatever `synchronous_commit` was at COMMIT).
//! Then, per `sqs_ingest.delete_after`:
//!
//! * `local`: nothing more. A failover to a standby that had not received the commit loses its messages.
//! * `any_standby`: at least one standby the primary knows has flushed the commit's WAL.
//! * `all_standbys` (the default): every standby the primary knows has flushed it.
//!
//! The standbys the primary knows are its physical replication slots (kept while a standby is disconnected, so a
//! stopped standby still counts) and the streaming physical standbys connected without a slot (forgotten once they
//! disconnect). No standby known: the local flush is all there is to wait for.
//!
//! Flushed, not applied: a promoted standby replays all the WAL it has flushed before it accepts writes, so a
//! commit flushed on the standby that is promoted is on the new primary.
//!
//! Pure: the caller reads the standbys' positions from shared memory and passes them in.

/// `sqs_ingest.delete_after`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeleteAfter {
    Local,
    AnyStandby,
    AllStandbys,
}

/// One standby the primary knows, as the primary last heard from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Standby {
    /// The WAL position it reported flushed (0: never reported).
    pub flush: u64,
    /// Whether it is connected now (it can still confirm more).
    pub connected: bool,
}

/// What a commit's deletes do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Durable as required: delete.
    Durable,
    /// Not yet, but a connected standby may still confirm it: wait (until the deadline).
    Wait,
    /// Not confirmed and no standby that could confirm it is connected: leave the messages in the queue (they come
    /// back after their visibility timeout and are recognised as duplicates by the ledger).
    Defer,
}

/// Whether a commit whose WAL ends at `lsn` (flushed locally) is durable as `rule` requires.
pub fn judge(lsn: u64, rule: DeleteAfter, standbys: &[Standby]) -> Verdict {
    if rule == DeleteAfter::Local || standbys.is_empty() {
        return Verdict::Durable;
    }
    let has = |s: &Standby| s.flush >= lsn;
    let may_still = |s: &Standby| !has(s) && s.connected;
    match rule {
        DeleteAfter::Local => Verdict::Durable,
        DeleteAfter::AnyStandby if standbys.iter().any(has) => Verdict::Durable,
        DeleteAfter::AnyStandby if standbys.iter().any(may_still) => Verdict::Wait,
        DeleteAfter::AllStandbys if standbys.iter().all(has) => Verdict::Durable,
        // Every lagging standby must still be able to confirm: one that is disconnected cannot.
        DeleteAfter::AllStandbys if standbys.iter().filter(|s| !has(s)).all(|s| s.connected) => Verdict::Wait,
        _ => Verdict::Defer,
    }
}

/// The WAL position up to which every commit is durable as `rule` requires, given the local flush position.
pub fn confirmed(local_flush: u64, rule: DeleteAfter, standbys: &[Standby]) -> u64 {
    if rule == DeleteAfter::Local || standbys.is_empty() {
        return local_flush;
    }
    let flushes = standbys.iter().map(|s| s.flush);
    let by_standbys = match rule {
        DeleteAfter::AnyStandby => flushes.max().unwrap_or(0),
        _ => flushes.min().unwrap_or(0),
    };
    by_standbys.min(local_flush)
}

#[cfg(test)]
mod tests {
    use super::*;
    use DeleteAfter::*;
    use Verdict::*;

    const UP: bool = true;
    const DOWN: bool = false;
    fn s(flush: u64, connected: bool) -> Standby {
        Standby { flush, connected }
    }

    #[test]
    fn without_standbys_the_local_flush_is_enough() {
        for rule in [Local, AnyStandby, AllStandbys] {
            assert_eq!(judge(100, rule, &[]), Durable);
            assert_eq!(confirmed(100, rule, &[]), 100);
        }
    }

    #[test]
    fn local_ignores_standbys() {
        assert_eq!(judge(100, Local, &[s(0, DOWN), s(5, UP)]), Durable);
        assert_eq!(confirmed(100, Local, &[s(0, DOWN)]), 100);
    }

    #[test]
    fn all_standbys_needs_every_one() {
        assert_eq!(judge(100, AllStandbys, &[s(100, UP), s(150, DOWN)]), Durable);
        assert_eq!(judge(100, AllStandbys, &[s(100, UP), s(99, UP)]), Wait);
        // A stopped standby (its slot kept) that has not flushed the commit cannot confirm it: defer at once.
        assert_eq!(judge(100, AllStandbys, &[s(100, UP), s(99, DOWN)]), Defer);
        assert_eq!(judge(100, AllStandbys, &[s(0, DOWN)]), Defer);
        assert_eq!(confirmed(200, AllStandbys, &[s(100, UP), s(150, DOWN)]), 100);
    }

    #[test]
    fn any_standby_needs_one() {
        assert_eq!(judge(100, AnyStandby, &[s(10, DOWN), s(100, UP)]), Durable);
        assert_eq!(judge(100, AnyStandby, &[s(10, DOWN), s(99, UP)]), Wait);
        assert_eq!(judge(100, AnyStandby, &[s(10, DOWN), s(99, DOWN)]), Defer);
        assert_eq!(confirmed(200, AnyStandby, &[s(100, UP), s(150, DOWN)]), 150);
    }

    #[test]
    fn never_beyond_the_local_flush() {
        assert_eq!(confirmed(120, AllStandbys, &[s(150, UP)]), 120);
    }
}
