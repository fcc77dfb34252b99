// In-database tests (`cargo pgrx test`): no SQS endpoint needed. Live-queue tests are in pgrx-tests/.
use pgrx::prelude::*;

#[pg_test]
fn app_version_text_prints_packed_codes() {
    assert_eq!(Spi::get_one::<String>("SELECT sqs_ingest.app_version_text(20300)").unwrap().as_deref(), Some("2.3.0"));
    assert_eq!(Spi::get_one::<String>("SELECT sqs_ingest.app_version_text(9600)").unwrap().as_deref(), Some("0.96.0"));
    assert_eq!(Spi::get_one::<String>("SELECT sqs_ingest.app_version_text(-1)").unwrap(), None);
}
