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

/// Enums are documented with the values the API sends and takes, not the
/// Rust variant names (`string_enum!` once gave `LvmRaid1` for
/// `lvm_raid1`).
#[test]
fn enums_list_their_wire_values() {
    use kiln_types::catalog::StorageLayout;
    use kiln_types::job::JobState;
    use kiln_types::machine::MachineState;
    let doc: serde_json::Value = serde_json::from_str(&kiln_server::api::openapi_json()).unwrap();
    let values = |name: &str| -> Vec<String> {
        doc["components"]["schemas"][name]["enum"]
            .as_array()
            .unwrap_or_else(|| panic!("{name} has no enum"))
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect()
    };
    let wire = |all: Vec<&str>| all.into_iter().map(String::from).collect::<Vec<_>>();
    assert_eq!(
        values("MachineState"),
        wire(MachineState::ALL.iter().map(|s| s.as_str()).collect())
    );
    assert_eq!(
        values("JobState"),
        wire(JobState::ALL.iter().map(|s| s.as_str()).collect())
    );
    assert_eq!(
        values("StorageLayout"),
        wire(StorageLayout::ALL.iter().map(|s| s.as_str()).collect())
    );
    assert!(values("StorageLayout").contains(&"lvm_raid1".to_string()));
}
