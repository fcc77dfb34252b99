//! The `sqs_ingest.mask()` SQL function, written against Postgres' V1 calling convention (the per-row hot path of
//! bulk masking).

use pgrx::prelude::*;

/// `sqs_ingest.mask(value text, method text DEFAULT NULL)`: masks a value with the active key, `encrypt`
/// (reversible, the default from `sqs_ingest.masking_method`) or `hmac` (irreversible).
///
/// Written against Postgres' V1 calling convention directly rather than through `#[pg_extern]`: it runs once per
/// row in bulk masking, where pgrx's generic argument and return conversions cost as much as the HMAC itself.
/// The symbol and SQL definition are the ones `#[pg_extern]` generated up to 0.2.1, so install and upgrade scripts
/// are unchanged.
#[no_mangle]
#[doc(hidden)]
pub extern "C" fn pg_finfo_mask_wrapper() -> &'static pg_sys::Pg_finfo_record {
    const V1: pg_sys::Pg_finfo_record = pg_sys::Pg_finfo_record { api_version: 1 };
    &V1
}

thread_local! {
    static TOKEN: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
}

/// # Safety
/// Called by Postgres through the V1 convention with the two arguments its SQL definition declares.
#[no_mangle]
#[pg_guard]
pub unsafe extern "C-unwind" fn mask_wrapper(fcinfo: pg_sys::FunctionCallInfo) -> pg_sys::Datum {
    use crate::error::Error;
    // SAFETY: Postgres passes a valid fcinfo with `nargs` initialised arguments; text arguments are varlenas
    // (detoasted here, possibly into the current memory context), read only while this call runs.
    unsafe {
        let nargs = (*fcinfo).nargs as usize;
        let args = (*fcinfo).args.as_slice(nargs);
        let text = |i: usize| -> Option<&[u8]> {
            let a = args.get(i).filter(|a| !a.isnull)?;
            let v = pg_sys::pg_detoast_datum_packed(a.value.cast_mut_ptr::<pg_sys::varlena>());
            Some(pgrx::varlena::varlena_to_byte_slice(v))
        };
        let Some(value) = text(0) else {
            (*fcinfo).isnull = true;
            return pg_sys::Datum::from(0usize);
        };
        let method_name = text(1).map(|b| std::str::from_utf8(b).unwrap_or("\u{fffd}"));
        let method = crate::gucs::masking_method_or(method_name).unwrap_or_else(|e| Error::from(e).raise());
        let key = crate::keys::active_material(false).unwrap_or_else(|e| e.raise());
        TOKEN.with(|t| {
            let mut token = t.borrow_mut();
            key.mask_into(method, value, &mut token).unwrap_or_else(|e| Error::from(e).raise());
            crate::audit::count_mask();
            pg_sys::Datum::from(pg_sys::cstring_to_text_with_len(token.as_ptr().cast(), token.len() as i32))
        })
    }
}

pgrx::extension_sql!(
    r#"
CREATE  FUNCTION sqs_ingest."mask"(
	"value" TEXT, /* Option < & str > */
	"method" TEXT DEFAULT NULL /* Option < & str > */
) RETURNS TEXT /* Option < String > */
STABLE PARALLEL RESTRICTED
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'mask_wrapper';
"#,
    name = "mask_function"
);
