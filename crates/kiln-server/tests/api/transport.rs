//! Transport (issue 14): the API over TLS with the certificate kiln
//! generates, pinned by fingerprint; the plain-HTTP boot listener that
//! serves firmware and agents only; the client address behind trusted
//! proxies.

use kiln_client::{Client, ClientError, Trust};
use kiln_server::Settings;
use kiln_server::config::{ApiSettings, BootSettings};
use kiln_test_utils::{TestServer, api_test};
use reqwest::Method;

fn api(api: ApiSettings) -> Settings {
    Settings {
        api: Some(api),
        ..Default::default()
    }
}

fn tls() -> Settings {
    api(ApiSettings {
        tls: Some(true),
        ..Default::default()
    })
}

api_test!(
    the_api_over_tls_with_the_generated_certificate,
    settings = tls(),
    |srv| {
        assert!(srv.url.starts_with("https://"), "{}", srv.url);
        let fp = srv.fingerprint.clone().unwrap();
        // The certificate is the one kiln wrote into the data directory.
        let cert = srv.config.data_dir.join("tls/cert.pem");
        assert_eq!(kiln_server::tls::fingerprint_of_file(&cert).unwrap(), fp);
        let me = srv.admin().whoami().await.unwrap();
        assert_eq!(me.token.name, "test-admin");
        assert_eq!(me.client_address, "127.0.0.1", "ConnectInfo reaches handlers over TLS");
        // Firmware's and agents' routes answer on the API listener too.
        let r = srv
            .client(None)
            .raw(Method::GET, "/boot/ipxe?mac=52:54:00:00:00:99")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert!(r.text().await.unwrap().starts_with("#!ipxe"));

        // Another certificate's fingerprint: refused, naming the one seen and
        // how to check it; the handshake fails, so no token was sent.
        let wrong = Trust::Fingerprint([7; 32]);
        let e = Client::with_trust(&srv.url, Some(srv.admin_token.clone()), &wrong)
            .unwrap()
            .whoami()
            .await
            .unwrap_err();
        match &e {
            ClientError::Fingerprint { seen, pinned, .. } => {
                assert_eq!(seen, &fp);
                assert_eq!(pinned, &format!("sha256:{}", "07".repeat(32)));
            }
            other => panic!("not a fingerprint refusal: {other:?}"),
        }
        let msg = e.to_string();
        assert!(msg.contains(&fp) && msg.contains("kiln server fingerprint"), "{msg}");

        // No pin: the system's roots do not vouch for a generated certificate.
        let e = Client::with_trust(&srv.url, Some(srv.admin_token.clone()), &Trust::System)
            .unwrap()
            .whoami()
            .await
            .unwrap_err();
        assert!(matches!(e, ClientError::Untrusted { .. }), "{e:?}");
        assert!(e.to_string().contains("KILN_FINGERPRINT=sha256:"), "{e}");

        // The certificate as a CA file (its names include 127.0.0.1).
        let by_ca = Client::with_trust(&srv.url, Some(srv.admin_token.clone()), &Trust::CaFile(cert.clone())).unwrap();
        assert_eq!(by_ca.whoami().await.unwrap().token.name, "test-admin");

        // Plain HTTP to the TLS port gets no answer.
        let plain = Client::new(&srv.url.replace("https://", "http://"), Some(srv.admin_token.clone()));
        assert!(matches!(plain.whoami().await.unwrap_err(), ClientError::Connect { .. }));
    }
);

fn boot_listener() -> Settings {
    Settings {
        boot: Some(BootSettings {
            listen: Some("127.0.0.1:0".parse().unwrap()),
            ..Default::default()
        }),
        ..tls()
    }
}

api_test!(
    the_boot_listener_serves_firmware_and_agents_only,
    settings = boot_listener(),
    |srv| {
        let boot = srv.boot_url.clone().unwrap();
        assert!(boot.starts_with("http://"));
        let http = reqwest::Client::new();
        let get = |path: &str| http.get(format!("{boot}{path}")).bearer_auth(&srv.admin_token).send();
        let r = get("/boot/ipxe?mac=52:54:00:00:00:99").await.unwrap();
        assert_eq!(r.status(), 200);
        assert!(r.text().await.unwrap().starts_with("#!ipxe"));
        // The API is not here, even with an admin token.
        for path in [
            "/api/v1/machines",
            "/api/v1/whoami",
            "/api/v1/tokens",
            "/healthz",
            "/api/v1/openapi.json",
        ] {
            let r = get(path).await.unwrap();
            assert_eq!(r.status(), 404, "{path}");
            let body = r.text().await.unwrap();
            assert!(body.contains("boot listener"), "{path}: {body}");
        }
        // The agents' endpoints are: refused for want of their own token (or
        // of a valid body), never "no such endpoint".
        let id = uuid::Uuid::new_v4();
        let r = get(&format!("/api/v1/jobs/{id}/plan")).await.unwrap();
        assert_eq!(r.status(), 401);
        for path in [
            format!("/api/v1/jobs/{id}/stages/1"),
            format!("/api/v1/jobs/{id}/failure"),
            "/api/v1/discovery".into(),
        ] {
            let r = http
                .post(format!("{boot}{path}"))
                .json(&serde_json::json!({}))
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            assert!(matches!(status, 400 | 401 | 422), "{path}: {status}");
        }
    }
);

async fn seen_from(srv: &TestServer, forwarded: Option<&str>) -> String {
    let mut req = srv.admin().raw(Method::GET, "/api/v1/whoami");
    if let Some(f) = forwarded {
        req = req.header("X-Forwarded-For", f);
    }
    let me: kiln_types::auth::WhoAmI = req.send().await.unwrap().json().await.unwrap();
    me.client_address
}

fn behind_proxy() -> Settings {
    api(ApiSettings {
        tls: Some(true),
        trusted_proxies: vec!["127.0.0.0/8".parse().unwrap()],
        ..Default::default()
    })
}

api_test!(
    forwarded_for_counts_from_a_trusted_proxy,
    settings = behind_proxy(),
    |srv| {
        assert_eq!(seen_from(&srv, None).await, "127.0.0.1");
        assert_eq!(seen_from(&srv, Some("203.0.113.7")).await, "203.0.113.7");
        // A hop the client wrote before ours is not believed.
        assert_eq!(seen_from(&srv, Some("198.51.100.1, 203.0.113.7")).await, "203.0.113.7");
    }
);

api_test!(forwarded_for_is_ignored_from_anyone_else, |srv| {
    assert_eq!(seen_from(&srv, None).await, "127.0.0.1");
    assert_eq!(seen_from(&srv, Some("203.0.113.7")).await, "127.0.0.1");
});
