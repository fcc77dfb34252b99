//! Statements the hot paths run over and over (per ingest batch, per `unmask` call), prepared once per backend
//! and kept (`SPI_keepplan`), so each execution skips parsing, analysis and planning.
//!
//! Plans are keyed by their SQL text; parameter types come from the first call's arguments, so one SQL text
//! must always be called with the same argument types (each caller's casts in the SQL make that so). Postgres'
//! plan cache revalidates a kept plan after DDL on the objects it uses (ALTER TABLE, DROP and re-CREATE
//! EXTENSION), re-resolving names with the search_path the plan was made under; every statement here names its
//! objects schema-qualified, so that path does not matter. Privileges are checked at each execution, as the
//! role current then.

use pgrx::datum::DatumWithOid;
use pgrx::prelude::*;
use pgrx::spi::{OwnedPreparedStatement, SpiClient, SpiResult, SpiTupleTable};
use pgrx::PgOid;
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

/// More distinct statements than this (target tables come and go) and the cache starts over.
const MAX_PLANS: usize = 64;

thread_local! {
    static PLANS: RefCell<HashMap<String, Rc<OwnedPreparedStatement>>> = RefCell::new(HashMap::new());
}

fn plan(client: &SpiClient<'_>, sql: &str, args: &[DatumWithOid<'_>]) -> SpiResult<Rc<OwnedPreparedStatement>> {
    if let Some(p) = PLANS.with(|p| p.borrow().get(sql).cloned()) {
        return Ok(p);
    }
    let types: Vec<PgOid> = args.iter().map(|a| PgOid::from_untagged(a.oid())).collect();
    let kept = Rc::new(client.prepare_mut(sql, &types)?.keep());
    PLANS.with(|p| {
        let mut p = p.borrow_mut();
        if p.len() >= MAX_PLANS {
            p.clear();
        }
        p.insert(sql.to_string(), kept.clone());
    });
    Ok(kept)
}

/// Runs `sql` with `args` through its kept plan and hands the result to `read` inside the SPI connection.
pub fn run<R>(sql: &str, args: &[DatumWithOid<'_>], read: impl for<'c> FnOnce(SpiTupleTable<'c>) -> R) -> SpiResult<R> {
    Spi::connect_mut(|client| {
        let plan = plan(client, sql, args)?;
        let table = client.update(&*plan, None, args)?;
        Ok(read(table))
    })
}
