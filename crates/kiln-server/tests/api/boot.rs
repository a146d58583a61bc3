//! HTTP boot: scripts from the boot decision, files with Range, explain.

use kiln_server::Settings;
use kiln_server::config::BootSettings;
use kiln_test_utils::{Backend, TestServer, api_test};
use kiln_types::machine::{MachineCreate, MachineState};

async fn script(srv: &TestServer, query: &str, host: Option<&str>) -> (u16, String) {
    let mut req = reqwest::Client::new().get(format!("{}/boot/ipxe?{query}", srv.url));
    if let Some(h) = host {
        req = req.header("host", h);
    }
    let resp = req.send().await.unwrap();
    (resp.status().as_u16(), resp.text().await.unwrap())
}

fn deployed(host: &str, mac: &str) -> MachineCreate {
    let mut m = MachineCreate::new(host.parse().unwrap());
    m.state = MachineState::Deployed;
    m.nics = vec![serde_json::from_value(serde_json::json!({"mac": mac})).unwrap()];
    m
}

api_test!(deployed_machines_are_sent_to_their_disk, |srv| {
    srv.admin()
        .create_machine(&deployed("web1", "52:54:00:00:00:01"))
        .await
        .unwrap();
    let (status, s) = script(&srv, "mac=52-54-00-00-00-01&platform=pcbios", None).await;
    assert_eq!(status, 200);
    assert!(
        s.starts_with("#!ipxe\n") && s.contains("sanboot --no-describe --drive 0x80"),
        "{s}"
    );
    assert!(!s.contains("kernel"), "{s}");
    let (_, s) = script(&srv, "mac=52:54:00:00:00:01&platform=efi", None).await;
    assert!(s.contains("\nexit\n") && !s.contains("kernel"), "{s}");
    // Unknown, discovery off: told it is not managed here.
    let (_, s) = script(&srv, "mac=52:54:00:00:00:99", None).await;
    assert!(s.contains("not managed here") && !s.contains("kernel"), "{s}");
    let (status, s) = script(&srv, "mac=nonsense", None).await;
    assert_eq!(status, 400, "{s}");
    // Explain says the same, by hostname or by MAC.
    let e = srv.admin().boot_explain("web1", None).await.unwrap();
    assert_eq!(e["answer"], "local_disk");
    assert!(e["reason"].as_str().unwrap().contains("deployed, no job armed"), "{e}");
    let e = srv.admin().boot_explain("52:54:00:00:00:99", None).await.unwrap();
    assert_eq!(e["answer"], "no_answer");
    assert_eq!(
        srv.admin().boot_explain("nope", None).await.unwrap_err().status(),
        Some(404)
    );
});

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_boots_the_agent_and_hosts_cannot_inject() {
    let settings = Settings {
        boot: Some(BootSettings {
            discovery: true,
            ..Default::default()
        }),
        ..Default::default()
    };
    let srv = TestServer::start_with(Backend::Sqlite, settings).await;
    let (status, s) = script(&srv, "mac=52:54:00:00:00:77", Some("10.0.0.1:7070")).await;
    assert_eq!(status, 200, "{s}");
    let kernel = s
        .lines()
        .find(|l| l.starts_with("kernel "))
        .unwrap_or_else(|| panic!("{s}"));
    assert!(
        kernel.starts_with("kernel http://10.0.0.1:7070/boot/file/vmlinuz "),
        "{kernel}"
    );
    assert!(
        kernel.contains("kiln.mode=discover") && kernel.contains("kiln.server=http://10.0.0.1:7070"),
        "{kernel}"
    );
    assert!(
        s.contains("initrd http://10.0.0.1:7070/boot/file/kiln-agent.cpio.gz\n"),
        "{s}"
    );
    // A Host header is client data: one that could expand iPXE settings is refused.
    let (status, s) = script(&srv, "mac=52:54:00:00:00:77", Some("x${net0/ip}")).await;
    assert_eq!(status, 500, "{s}");
    assert!(!s.contains("kernel"));
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_are_served_with_ranges() {
    let srv = TestServer::start(Backend::Sqlite).await;
    let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(srv.state.boot.artifacts.join("vmlinuz"), &data).unwrap();
    let http = reqwest::Client::new();
    let url = format!("{}/boot/file/vmlinuz", srv.url);
    let full = http.get(&url).send().await.unwrap();
    assert_eq!(full.status(), 200);
    assert_eq!(full.headers()["content-length"], "100000");
    assert_eq!(full.bytes().await.unwrap().as_ref(), &data[..]);
    let part = http.get(&url).header("range", "bytes=1000-1999").send().await.unwrap();
    assert_eq!(part.status(), 206);
    assert_eq!(part.headers()["content-range"], "bytes 1000-1999/100000");
    assert_eq!(part.bytes().await.unwrap().as_ref(), &data[1000..2000]);
    let missing = http
        .get(format!("{}/boot/file/../kiln.db", srv.url))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
    let missing = http
        .get(format!("{}/boot/file/%2e%2e/kiln.db", srv.url))
        .send()
        .await
        .unwrap();
    assert!(
        missing.status() == 404 || missing.status() == 400,
        "{}",
        missing.status()
    );
    srv.stop().await;
}
