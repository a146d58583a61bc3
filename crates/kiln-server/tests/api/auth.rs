//! Tokens, roles and tenant isolation.

use std::time::Duration;

use kiln_server::Settings;
use kiln_server::auth::AuthSettings;
use kiln_test_utils::api_test;
use kiln_types::auth::{Role, TenantCreate, TokenCreate};
use kiln_types::event::{Event, EventFilter};
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
            expires_at: None,
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
    // Unknown tokens are logged, not audited: anyone can send them.
    assert!(audited(&srv, "security.").await.is_empty());
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
            expires_at: None,
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
            expires_at: None,
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

/// The audit events whose action starts with `action`, newest first.
async fn audited(srv: &kiln_test_utils::TestServer, action: &str) -> Vec<Event> {
    srv.admin()
        .list_events(&EventFilter {
            action: Some(action.into()),
            ..Default::default()
        })
        .await
        .unwrap()
        .items
}

fn operator(name: &str, expires_at: Option<chrono::DateTime<chrono::Utc>>) -> TokenCreate {
    TokenCreate {
        role: Role::Operator,
        tenant: None,
        name: Some(name.into()),
        expires_at,
    }
}

api_test!(an_expired_token_is_refused_on_its_next_request, |srv| {
    let admin = srv.admin();
    let expires = chrono::Utc::now() + chrono::Duration::milliseconds(1500);
    let created = admin.create_token(&operator("short", Some(expires))).await.unwrap();
    let short = srv.client(Some(&created.token));
    assert_eq!(short.whoami().await.unwrap().token.expires_at, created.info.expires_at);
    let until = created.info.expires_at.unwrap() - chrono::Utc::now();
    tokio::time::sleep(until.to_std().unwrap_or_default() + Duration::from_millis(50)).await;
    let e = short.whoami().await.unwrap_err();
    assert_eq!(e.status(), Some(401), "{e}");
    assert!(e.to_string().contains("`short` expired at"), "{e}");
    // Using it is audited, with where it came from.
    let refused = audited(&srv, "security.token_refused").await;
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert_eq!(refused[0].actor, "short (operator)");
    assert_eq!(refused[0].target_name, "short");
    let detail = refused[0].after.as_ref().unwrap();
    assert_eq!(detail["client"], "127.0.0.1");
    assert_eq!(detail["path"], "/api/v1/whoami");

    // Expiries the server will not give.
    let e = admin
        .create_token(&operator(
            "past",
            Some(chrono::Utc::now() - chrono::Duration::seconds(1)),
        ))
        .await
        .unwrap_err();
    assert_eq!(e.status(), Some(400));
    assert!(e.to_string().contains("not in the future"), "{e}");
    let e = admin
        .create_token(&operator(
            "forever",
            Some(chrono::Utc::now() + chrono::Duration::days(400)),
        ))
        .await
        .unwrap_err();
    assert_eq!(e.status(), Some(400));
    assert!(e.to_string().contains("max_token_lifetime_days"), "{e}");
    // Asking for none gets the longest a token may live: 365 days by default.
    let default = admin.create_token(&operator("default", None)).await.unwrap();
    let left = default.info.expires_at.unwrap() - chrono::Utc::now();
    assert!(
        left > chrono::Duration::days(364) && left <= chrono::Duration::days(365),
        "{left}"
    );
    let listed = admin.list_tokens().await.unwrap();
    assert_eq!(
        listed.iter().find(|t| t.name == "default").unwrap().expires_at,
        default.info.expires_at,
        "listing shows the expiry"
    );
});

api_test!(a_revoked_token_is_refused_on_its_next_request, |srv| {
    let admin = srv.admin();
    let created = admin.create_token(&operator("ops", None)).await.unwrap();
    let ops = srv.client(Some(&created.token));
    // Used a few times first: nothing it leaves behind may outlive the revocation.
    for _ in 0..3 {
        ops.whoami().await.unwrap();
    }
    admin.revoke_token("ops").await.unwrap();
    let e = ops.whoami().await.unwrap_err();
    assert_eq!(e.status(), Some(401));
    assert!(e.to_string().contains("`ops` was revoked at"), "{e}");
    assert_eq!(audited(&srv, "security.token_refused").await.len(), 1);
});

api_test!(last_use_is_recorded_at_most_once_a_minute, |srv| {
    let admin = srv.admin();
    let created = admin.create_token(&operator("ci", None)).await.unwrap();
    let find = |tokens: Vec<kiln_types::auth::TokenInfo>| tokens.into_iter().find(|t| t.name == "ci").unwrap();
    let before = find(admin.list_tokens().await.unwrap());
    assert_eq!((before.last_used_at, before.last_used_from), (None, None));
    let t0 = chrono::Utc::now();
    let ci = srv.client(Some(&created.token));
    ci.whoami().await.unwrap();
    let used = find(admin.list_tokens().await.unwrap());
    let at = used.last_used_at.expect("the first use is recorded");
    assert!(
        at >= t0 - chrono::Duration::seconds(1) && at <= chrono::Utc::now(),
        "{at}"
    );
    assert_eq!(used.last_used_from.as_deref(), Some("127.0.0.1"));
    // Used again within the minute: not written again.
    ci.whoami().await.unwrap();
    assert_eq!(find(admin.list_tokens().await.unwrap()).last_used_at, Some(at));
});

/// A client whose connections come from `source` (any 127/8 address
/// reaches the server on 127.0.0.1).
fn from(source: &str) -> reqwest::Client {
    reqwest::Client::builder()
        .local_address(source.parse::<std::net::IpAddr>().unwrap())
        .build()
        .unwrap()
}

async fn whoami_status(http: &reqwest::Client, srv: &kiln_test_utils::TestServer, token: &str) -> reqwest::Response {
    http.get(format!("{}/api/v1/whoami", srv.url))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
}

api_test!(
    failed_authentications_are_limited_per_source,
    settings = Settings {
        auth: Some(AuthSettings {
            failures_per_minute: 3,
            ..AuthSettings::default()
        }),
        ..Settings::default()
    },
    |srv| {
        let (one, two, three) = (from("127.0.0.1"), from("127.0.0.2"), from("127.0.0.3"));
        let admin = srv.admin_token.clone();
        // Successful calls are not limited and do not count.
        for _ in 0..10 {
            assert_eq!(whoami_status(&three, &srv, &admin).await.status(), 200);
        }
        for _ in 0..2 {
            assert_eq!(whoami_status(&three, &srv, "kiln_wrong").await.status(), 401);
        }
        assert_eq!(whoami_status(&three, &srv, &admin).await.status(), 200);
        // Three failures from one source; the fourth call is refused, even
        // with a valid token: the limit comes before the lookup.
        for i in 0..3 {
            assert_eq!(
                whoami_status(&one, &srv, "kiln_wrong").await.status(),
                401,
                "failure {i}"
            );
        }
        for token in ["kiln_wrong", admin.as_str()] {
            let resp = whoami_status(&one, &srv, token).await;
            assert_eq!(resp.status(), 429);
            let wait: u64 = resp.headers()["retry-after"].to_str().unwrap().parse().unwrap();
            assert!((1..=60).contains(&wait), "Retry-After {wait}");
            let body: kiln_types::error::ApiError = resp.json().await.unwrap();
            assert_eq!(body.code, "too_many_requests");
            assert!(
                body.message.contains("127.0.0.1") && body.message.contains("failures_per_minute"),
                "{}",
                body.message
            );
        }
        // Another source is still answered, 401 or 200 as its token deserves.
        assert_eq!(whoami_status(&two, &srv, "kiln_wrong").await.status(), 401);
        assert_eq!(whoami_status(&two, &srv, &admin).await.status(), 200);
        assert_eq!(
            whoami_status(&three, &srv, "kiln_wrong").await.status(),
            401,
            "2 + 1 = 3 failures"
        );
        assert_eq!(whoami_status(&three, &srv, &admin).await.status(), 429);
        // Routes that take no API token are not affected.
        assert_eq!(
            one.get(format!("{}/healthz", srv.url)).send().await.unwrap().status(),
            200
        );
    }
);

api_test!(refused_calls_by_valid_tokens_are_audited, |srv| {
    let admin = srv.admin();
    let acme = srv.client(Some(&tenant_token(&srv, "acme").await));
    let _ = tenant_token(&srv, "globex").await;
    admin.create_machine(&owned("acme1", "acme")).await.unwrap();
    admin.create_machine(&owned("globex1", "globex")).await.unwrap();
    let ops = srv.client(Some(&admin.create_token(&operator("ops", None)).await.unwrap().token));
    // Allowed calls, and an admin's plain "no such machine", are not refusals.
    acme.get_machine("acme1").await.unwrap();
    assert_eq!(admin.get_machine("nope").await.unwrap_err().status(), Some(404));
    assert!(audited(&srv, "security.refused").await.is_empty());

    // A tenant's 403 (role), a tenant's 404 (another tenant's machine), an
    // operator's 403: one event each, newest first.
    assert_eq!(acme.delete_machine("acme1").await.unwrap_err().status(), Some(403));
    assert_eq!(acme.get_machine("globex1").await.unwrap_err().status(), Some(404));
    assert_eq!(ops.list_tokens().await.unwrap_err().status(), Some(403));
    let events = audited(&srv, "security.refused").await;
    assert_eq!(events.len(), 3, "{events:#?}");
    let (op, not_found, forbidden) = (&events[0], &events[1], &events[2]);

    assert!(forbidden.actor.ends_with("(tenant)"), "{forbidden:?}");
    assert_eq!(forbidden.target_kind, "request");
    assert_eq!(forbidden.target_name, "DELETE /api/v1/machines/acme1");
    let d = forbidden.after.as_ref().unwrap();
    assert_eq!(d["status"], 403);
    assert_eq!(d["client"], "127.0.0.1");
    assert_eq!(d["code"], "forbidden");
    assert!(d["message"].as_str().unwrap().contains("tenant token"), "{d}");

    assert_eq!(not_found.target_name, "GET /api/v1/machines/globex1");
    assert_eq!(not_found.after.as_ref().unwrap()["status"], 404);
    assert_eq!(not_found.actor, forbidden.actor);

    assert_eq!(op.actor, "ops (operator)");
    assert_eq!(op.target_name, "GET /api/v1/tokens");
    assert!(
        !serde_json::to_string(&events).unwrap().contains("kiln_"),
        "no token in the audit log"
    );
});
