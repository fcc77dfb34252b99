//! `rekey()`: rewrites a target's reversible tokens minted with an older key to the active key, each back into the
//! row it was read from. The token columns of a table are the login pipeline's (`masked_ip`, `masked_device_id`)
//! when it has them, and every column a pipeline into it declares with `"mask": "encrypt"`.

use crate::error::{Error, Result};
use crate::privilege::{as_owner, as_role, extension_owner, pinned, writer_for};
use crate::{keys, target};
use pgrx::prelude::*;
use pgrx::PgSqlErrorCode;
use sqs_ingest_core::mask::Method;
use sqs_ingest_core::pipeline::Transform;

/// Rewrites the tokens of `target` as its owner when the caller is a superuser and the owner is not (so the
/// owner's triggers run with the owner's rights), always with a pinned search_path. Each token is written back
/// into the row it was read from: rows are matched by `(tableoid, ctid)`, since a ctid repeats across the
/// partitions of a partitioned table. 22023 when the table has no token columns.
pub fn rekey(target_oid: pg_sys::Oid) -> Result<i64> {
    pinned(|| {
        let t = target::resolve_oid(target_oid)?;
        let columns = token_columns(&t)?;
        if columns.is_empty() {
            return Err(Error::Pipeline {
                code: PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
                message: format!(
                    "table {} has no token columns: neither masked_ip/masked_device_id nor a column a pipeline masks with encrypt",
                    t.name
                ),
            });
        }
        as_role(writer_for(t.owner), || rekey_rows(&t, &columns))
    })
}

/// Every table that holds tokens: the login pipeline's target (`sqs_ingest.target_table`, if it exists) and the
/// target of every declared pipeline that masks with `encrypt`, each with its rewritten token count.
pub fn rekey_all() -> Result<Vec<(String, i64)>> {
    let login = crate::gucs::target_table();
    let mut oids: Vec<pg_sys::Oid> =
        Spi::get_one_with_args::<pg_sys::Oid>("SELECT pg_catalog.to_regclass($1)::pg_catalog.oid", &[login.into()])
            .ok()
            .flatten()
            .into_iter()
            .collect();
    let pipelines: Vec<pg_sys::Oid> = as_owner(extension_owner(), || {
        Spi::connect(|c| {
            let rows = c.select(
                "SELECT DISTINCT pg_catalog.to_regclass(target)::pg_catalog.oid FROM sqs_ingest.pipelines
                  WHERE pg_catalog.to_regclass(target) IS NOT NULL",
                None,
                &[],
            )?;
            Ok::<_, pgrx::spi::SpiError>(rows.filter_map(|r| r.get::<pg_sys::Oid>(1).ok().flatten()).collect())
        })
    })
    .map_err(|e| Error::Internal(e.to_string()))?;
    for oid in pipelines {
        if !oids.contains(&oid) {
            oids.push(oid);
        }
    }
    let mut out = Vec::new();
    for oid in oids {
        let t = pinned(|| target::resolve_oid(oid))?;
        let columns = pinned(|| token_columns(&t))?;
        if !columns.is_empty() {
            let n = pinned(|| as_role(writer_for(t.owner), || rekey_rows(&t, &columns)))?;
            out.push((t.name.clone(), n));
        }
    }
    Ok(out)
}

/// The columns of `t` that hold reversible tokens, in the table's order.
fn token_columns(t: &target::Target) -> Result<Vec<String>> {
    let columns = target::columns(t.oid)?;
    let mut wanted: Vec<String> = ["masked_ip", "masked_device_id"].iter().map(|c| c.to_string()).collect();
    // Only pipelines that were declared on this very table (owned by the role that owned it then).
    let owner = crate::privilege::role_name(t.owner);
    let names: Vec<String> = as_owner(extension_owner(), || {
        Spi::connect(|c| {
            let rows = c.select(
                "SELECT name FROM sqs_ingest.pipelines
                  WHERE pg_catalog.to_regclass(target) OPERATOR(pg_catalog.=) $1::pg_catalog.regclass
                    AND target_owner OPERATOR(pg_catalog.=) $2",
                None,
                &[t.oid.into(), owner.into()],
            )?;
            Ok::<_, pgrx::spi::SpiError>(rows.filter_map(|r| r.get::<String>(1).ok().flatten()).collect())
        })
    })
    .map_err(|e| Error::Internal(e.to_string()))?;
    for name in names {
        for spec in crate::pipeline::load(&name)?.specs {
            if spec.transform == Transform::Mask(Method::Encrypt) {
                wanted.push(spec.column);
            }
        }
    }
    Ok(columns.into_iter().map(|c| c.name).filter(|n| wanted.contains(n)).collect())
}

fn rekey_rows(t: &target::Target, columns: &[String]) -> Result<i64> {
    let (ring, active) = keys::active_key()?;
    let key = ring.get(active).expect("active key");
    let active_prefix = format!("enc:{active}:");
    let current = format!("{active_prefix}%");
    let quoted: Vec<String> = columns.iter().map(|c| target::quote_ident(c)).collect();
    let stale: Vec<String> = quoted
        .iter()
        .map(|c| format!("({c}::pg_catalog.text LIKE 'enc:%' AND {c}::pg_catalog.text NOT LIKE $1)"))
        .collect();
    let sql = format!(
        "SELECT tableoid, ctid::pg_catalog.text, {} FROM {} WHERE {}",
        quoted.iter().map(|c| format!("{c}::pg_catalog.text")).collect::<Vec<_>>().join(", "),
        t.current_name()?,
        stale.join(" OR ")
    );
    #[allow(clippy::type_complexity)]
    let rows: Vec<(pg_sys::Oid, String, Vec<Option<String>>)> = Spi::connect(|c| {
        c.select(&sql, None, &[current.clone().into()]).map(|rows| {
            rows.map(|r| {
                (
                    r.get(1).ok().flatten().unwrap_or(pg_sys::Oid::INVALID),
                    r.get(2).ok().flatten().unwrap_or_default(),
                    (0..columns.len()).map(|i| r.get::<String>(i + 3).ok().flatten()).collect(),
                )
            })
            .collect()
        })
    })
    .map_err(|e| Error::Target(e.to_string()))?;
    let mut rewritten = 0i64;
    let (mut tables, mut ctids) = (Vec::new(), Vec::new());
    let mut values: Vec<Vec<Option<String>>> = vec![Vec::new(); columns.len()];
    let mut rekey_one = |token: Option<String>| -> Result<Option<String>> {
        match token {
            Some(t) if t.starts_with("enc:") && !t.starts_with(&active_prefix) => {
                let (_, clear) = ring.unmask(&t)?;
                rewritten += 1;
                Ok(Some(key.mask(Method::Encrypt, &clear)?))
            }
            other => Ok(other),
        }
    };
    for (table, ctid, tokens) in rows {
        tables.push(table);
        ctids.push(ctid);
        for (i, token) in tokens.into_iter().enumerate() {
            values[i].push(rekey_one(token)?);
        }
    }
    if !ctids.is_empty() {
        let sets: Vec<String> = quoted.iter().enumerate().map(|(i, c)| format!("{c} = u.x{i}")).collect();
        let unnests: Vec<String> =
            (0..columns.len()).map(|i| format!("pg_catalog.unnest(${}::pg_catalog.text[])", i + 3)).collect();
        let aliases: Vec<String> = (0..columns.len()).map(|i| format!("x{i}")).collect();
        let update = format!(
            "UPDATE {} AS t SET {}
               FROM ROWS FROM (pg_catalog.unnest($1::pg_catalog.oid[]), pg_catalog.unnest($2::pg_catalog.text[]::pg_catalog.tid[]), {})
                    AS u(tab, ctid, {})
              WHERE t.tableoid OPERATOR(pg_catalog.=) u.tab AND t.ctid OPERATOR(pg_catalog.=) u.ctid",
            t.current_name()?,
            sets.join(", "),
            unnests.join(", "),
            aliases.join(", ")
        );
        let mut args: Vec<pgrx::datum::DatumWithOid> = vec![tables.into(), ctids.into()];
        args.extend(values.into_iter().map(Into::into));
        Spi::run_with_args(&update, &args).map_err(|e| Error::Target(e.to_string()))?;
    }
    Ok(rewritten)
}
