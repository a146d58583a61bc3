//! The committed OpenAPI document must match what the code generates.
//! Regenerate with `KILN_UPDATE_OPENAPI=1 cargo test -p kiln-server openapi`.

use kiln_test_utils::{Backend, TestServer};

const COMMITTED: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../openapi/kiln.json");

#[test]
fn committed_document_is_current() {
    let generated = kiln_server::api::openapi_json();
    if std::env::var_os("KILN_UPDATE_OPENAPI").is_some() {
        std::fs::write(COMMITTED, &generated).unwrap();
        return;
    }
    let committed = std::fs::read_to_string(COMMITTED).unwrap_or_default();
    assert!(
        committed == generated,
        "openapi/kiln.json is stale: run `KILN_UPDATE_OPENAPI=1 cargo test -p kiln-server openapi` and commit it"
    );
}

#[tokio::test]
async fn served_document_is_the_committed_one() {
    let srv = TestServer::start(Backend::Sqlite).await;
    let served = srv.client(None).openapi().await.unwrap();
    let generated: serde_json::Value = serde_json::from_str(&kiln_server::api::openapi_json()).unwrap();
    assert_eq!(served, generated);
    assert!(served["paths"]["/api/v1/machines"]["get"].is_object());
    srv.stop().await;
}
