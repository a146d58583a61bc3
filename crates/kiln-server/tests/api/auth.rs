//! Tokens, roles and tenant isolation.

use kiln_test_utils::api_test;
use kiln_types::auth::{Role, TenantCreate, TokenCreate};
use kiln_types::machine::{MachineCreate, MachineFilter, MachinePatch};

async fn tenant_token(srv: &kiln_test_utils::TestServer, tenant: &str) -> String {
    let admin = srv.admin();
    admin
        .create_tenant(&TenantCreate {
            name: tenant.into(),
            description: None,
        })
        .await
        .unwrap();
    admin
        .create_token(&TokenCreate {
            role: Role::Tenant,
            tenant: Some(tenant.into()),
            name: None,
        })
        .await
        .unwrap()
        .token
}

fn owned(host: &str, owner: &str) -> MachineCreate {
    let mut m = MachineCreate::new(host.parse().unwrap());
    m.owner = Some(owner.into());
    m
}

api_test!(missing_or_wrong_token_is_401, |srv| {
    let anon = srv.client(None);
    let e = anon.list_machines(&MachineFilter::default()).await.unwrap_err();
    assert_eq!(e.status(), Some(401));
    assert!(e.to_string().contains("missing bearer token"), "{e}");
    let wrong = srv.client(Some("kiln_notatoken"));
    let e = wrong.get_machine("x").await.unwrap_err();
    assert_eq!(e.status(), Some(401));
    assert!(e.to_string().contains("not valid"), "{e}");
    // The raw header says how to authenticate.
    let resp = reqwest::get(format!("{}/api/v1/machines", srv.url)).await.unwrap();
    assert_eq!(resp.headers()["www-authenticate"], "Bearer realm=\"kiln\"");
    // Health needs no token.
    anon.healthz().await.unwrap();
});

api_test!(tenants_see_only_their_machines, |srv| {
    let acme = srv.client(Some(&tenant_token(&srv, "acme").await));
    let other = tenant_token(&srv, "globex").await;
    let admin = srv.admin();
    admin.create_machine(&owned("acme1", "acme")).await.unwrap();
    admin.create_machine(&owned("globex1", "globex")).await.unwrap();
    admin
        .create_machine(&MachineCreate::new("shared1".parse().unwrap()))
        .await
        .unwrap();

    let mine = acme.list_machines(&MachineFilter::default()).await.unwrap();
    assert_eq!(
        mine.items.iter().map(|m| m.hostname.as_str()).collect::<Vec<_>>(),
        ["acme1"]
    );
    assert_eq!(acme.get_machine("acme1").await.unwrap().owner.as_deref(), Some("acme"));
    // Another tenant's machine does not exist, as far as acme can tell: 404 everywhere.
    for e in [
        acme.get_machine("globex1").await.unwrap_err(),
        acme.machine_offer("globex1").await.unwrap_err(),
        acme.update_machine("globex1", &MachinePatch::default())
            .await
            .unwrap_err(),
        acme.delete_machine("globex1").await.unwrap_err(),
        acme.get_machine("shared1").await.unwrap_err(),
    ] {
        assert_eq!(e.status(), Some(404), "{e}");
    }
    // Its own machine it may read, not change; the inventory it may not grow.
    let e = acme.delete_machine("acme1").await.unwrap_err();
    assert_eq!(e.status(), Some(403), "{e}");
    let e = acme.create_machine(&owned("acme2", "acme")).await.unwrap_err();
    assert_eq!(e.status(), Some(403));
    let e = acme.list_events(&Default::default()).await.unwrap_err();
    assert_eq!(e.status(), Some(403));
    let e = acme
        .create_token(&TokenCreate {
            role: Role::Admin,
            tenant: None,
            name: None,
        })
        .await
        .unwrap_err();
    assert_eq!(e.status(), Some(403));
    assert!(admin.get_machine("globex1").await.is_ok());
    let _ = other;
});

api_test!(tokens_are_shown_once_hashed_and_revocable, |srv| {
    let admin = srv.admin();
    let created = admin
        .create_token(&TokenCreate {
            role: Role::Operator,
            tenant: None,
            name: Some("ops-ci".into()),
        })
        .await
        .unwrap();
    assert!(created.token.starts_with("kiln_") && created.token.len() >= 48);
    let ops = srv.client(Some(&created.token));
    assert_eq!(ops.whoami().await.unwrap().token.name, "ops-ci");
    // Listing tokens never shows a secret.
    let listed = serde_json::to_string(&admin.list_tokens().await.unwrap()).unwrap();
    assert!(!listed.contains(&created.token[5..]));
    // Operators manage machines, not tokens.
    assert!(
        ops.create_machine(&MachineCreate::new("op1".parse().unwrap()))
            .await
            .is_ok()
    );
    assert_eq!(ops.list_tokens().await.unwrap_err().status(), Some(403));
    admin.revoke_token("ops-ci").await.unwrap();
    assert_eq!(ops.whoami().await.unwrap_err().status(), Some(401));
    // The audit log says who did what.
    let events = admin.list_events(&Default::default()).await.unwrap().items;
    let create = events.iter().find(|e| e.action == "machine.create").unwrap();
    assert_eq!(create.actor, "ops-ci (operator)");
    assert!(
        events
            .iter()
            .any(|e| e.action == "token.revoke" && e.actor == "test-admin (admin)")
    );
    // Stored hashed: the token does not appear in the database.
    let raw: Vec<String> = sqlx::query_scalar::<sqlx::Any, String>("SELECT hash FROM tokens")
        .fetch_all(srv.state.store.pool())
        .await
        .unwrap();
    assert!(raw.iter().all(|h| h.len() == 64 && !h.contains(&created.token)));
});
