-- sqs_ingest 0.2.0 -> 0.2.1 (hand-written; `make test` proves an upgraded database equals a fresh 0.2.1 install).
\echo Use "ALTER EXTENSION sqs_ingest UPDATE TO '0.2.1'" to load this file. \quit

-- pg_dump must carry the identity sequences of the dumped tables too: without them a restored database hands out
-- ids that the restored rows already use, and the next unmask audit row or dead letter fails on the primary key.
SELECT pg_catalog.pg_extension_config_dump('sqs_ingest.dead_letters_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('sqs_ingest.unmask_audit_id_seq', '');
