//! Switch-port identity through the real DHCP listener (issue 15): a
//! machine enrolled by its port with no MAC learns it from a relayed
//! request, and HTTP boot then knows it by it; another MAC on the same port
//! (the server was swapped) flags the machine: no installer for its armed
//! job, a reimage refused with the reason, until an operator confirms the
//! port, after which it is installed again. The relay is this test, on
//! loopback (RFC 8357 relay source port, so no privileges).

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use dhcproto::v4::relay::{RelayAgentInformation, RelayCode, RelayInfo, UnknownInfo};
use dhcproto::v4::{DhcpOption, Message, MessageType};
use dhcproto::{Decodable, Decoder, Encodable};
use kiln_server::Settings;
use kiln_test_utils::{TestServer, api_test};
use kiln_types::MacAddr;
use kiln_types::job::JobState;
use kiln_types::machine::Nic;

use super::jobs::{catalog, ipxe, machine, request, sim, until};

const RELAY: Ipv4Addr = Ipv4Addr::new(127, 77, 15, 1);
const PORT: &str = "asw-a1:xe-0/0/7";
const OLD: &str = "52:54:00:15:00:0a";
const NEW: &str = "52:54:00:15:00:0b";

fn settings() -> Settings {
    toml::from_str(
        r#"
[dhcp]
mode = "full"
interfaces = ["lo"]
port = 0

[[dhcp.subnet]]
network = "127.77.0.0/16"
pool = ["127.77.16.1", "127.77.16.200"]

[jobs]
poll_interval_ms = 200
"#,
    )
    .unwrap()
}

/// A DISCOVER from `mac` relayed from switch port `circuit` as a switch
/// would (giaddr, option 82); returns the type of kiln's answer.
async fn relayed_discover(srv: &TestServer, mac: &str, circuit: &str) -> Option<MessageType> {
    let socket = tokio::net::UdpSocket::bind((RELAY, 0)).await.unwrap();
    let mac: MacAddr = mac.parse().unwrap();
    let mut msg = Message::new_with_id(
        0x1515_0000 | u32::from(mac.0[5]),
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        RELAY,
        &mac.0,
    );
    msg.set_hops(1);
    let mut info = RelayAgentInformation::default();
    info.insert(RelayInfo::AgentCircuitId(circuit.as_bytes().to_vec()));
    // RFC 8357: answer to the port this request came from.
    info.insert(RelayInfo::Unknown(UnknownInfo::new(RelayCode::Unknown(19), vec![])));
    let opts = msg.opts_mut();
    opts.insert(DhcpOption::MessageType(MessageType::Discover));
    opts.insert(DhcpOption::UserClass(b"iPXE".to_vec()));
    opts.insert(DhcpOption::RelayAgentInformation(info));
    let server = SocketAddr::V4(srv.dhcp_addr.expect("DHCP runs"));
    socket.send_to(&msg.to_vec().unwrap(), server).await.unwrap();
    let mut buf = vec![0u8; 1500];
    let (len, _) = tokio::time::timeout(Duration::from_secs(5), socket.recv_from(&mut buf))
        .await
        .ok()?
        .unwrap();
    Message::decode(&mut Decoder::new(&buf[..len]))
        .unwrap()
        .opts()
        .msg_type()
}

api_test!(
    a_port_learns_its_mac_and_a_swapped_server_waits_for_an_operator,
    settings = settings(),
    |srv| {
        let sim = sim().await;
        let admin = srv.admin();
        catalog(&admin).await;
        // Enrolled by its cabling only: no MAC anywhere.
        let mut spec = machine("racked1", OLD, sim.bmc(0).url());
        spec.nics = vec![Nic::by_port(Some(PORT.into()), None)];
        let m = admin.create_machine(&spec).await.unwrap();
        assert_eq!(m.nics[0].mac, None);
        // Before kiln saw the port, the MAC is unknown to HTTP boot.
        assert!(ipxe(&srv, OLD).await.contains("not managed here"));

        // The first relayed request: the MAC is learned before the answer.
        assert_eq!(relayed_discover(&srv, OLD, PORT).await, Some(MessageType::Offer));
        let m = admin.get_machine("racked1").await.unwrap();
        assert_eq!(m.nics[0].mac, Some(OLD.parse().unwrap()), "learned");
        assert_eq!(m.port_alert, None);
        let e = admin.boot_explain(OLD, None).await.unwrap();
        assert!(
            e["reason"].as_str().unwrap().starts_with("racked1"),
            "HTTP boot knows it: {e}"
        );

        // A reimage: the learned MAC gets the installer.
        let id = admin.reimage("racked1", &request()).await.unwrap().id.to_string();
        until(&admin, &id, "the installer wait", |j| {
            j.step == "wait_installer" && j.state == JobState::Waiting
        })
        .await;
        assert!(ipxe(&srv, OLD).await.contains("kernel"), "armed: the installer");
        // The deploy plan names the learned MAC for the agent's identity check.
        let token = srv.state.secrets.job_token(id.parse().unwrap());
        let plan: serde_json::Value = reqwest::Client::new()
            .get(format!("{}/api/v1/jobs/{id}/plan", srv.url))
            .bearer_auth(token.expose())
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(plan["identity"]["macs"], serde_json::json!([OLD]), "{plan:#}");

        // Another server on the port: flagged, and nothing is installed — not
        // on the new MAC (known as this machine, sent to its disk, not to
        // discovery) and not on the old one either.
        assert_eq!(relayed_discover(&srv, NEW, PORT).await, Some(MessageType::Offer));
        let m = admin.get_machine("racked1").await.unwrap();
        let alert = m.port_alert.clone().expect("flagged");
        assert_eq!(alert.seen_mac.to_string(), NEW);
        assert_eq!(alert.recorded_mac.to_string(), OLD);
        assert_eq!(
            m.nics[0].mac,
            Some(OLD.parse().unwrap()),
            "the record is not changed by the port"
        );
        for mac in [NEW, OLD] {
            let s = ipxe(&srv, mac).await;
            assert!(!s.contains("kernel") && s.contains("sanboot"), "{mac}: {s}");
        }
        let e = admin.boot_explain(NEW, None).await.unwrap();
        assert_eq!(e["answer"], "local_disk", "{e}");
        assert!(e["reason"].as_str().unwrap().contains("confirm-port"), "{e}");
        // A reimage is refused with the reason.
        admin.job_action(&id, "cancel").await.unwrap();
        until(&admin, &id, "the cancel", |j| j.state.is_final()).await;
        let e = admin.reimage("racked1", &request()).await.unwrap_err();
        assert_eq!(e.status(), Some(409), "{e}");
        assert!(
            e.to_string().contains("showed MAC 52:54:00:15:00:0b") && e.to_string().contains("confirm-port"),
            "{e}"
        );

        // The operator confirms: the new MAC is the machine's, and it installs.
        let m = admin.confirm_port("racked1").await.unwrap();
        assert_eq!(m.port_alert, None);
        assert_eq!(m.nics[0].mac, Some(NEW.parse().unwrap()));
        let e = admin.confirm_port("racked1").await.unwrap_err();
        assert_eq!(e.status(), Some(409), "nothing left to confirm: {e}");
        let id = admin.reimage("racked1", &request()).await.unwrap().id.to_string();
        until(&admin, &id, "the installer wait", |j| {
            j.step == "wait_installer" && j.state == JobState::Waiting
        })
        .await;
        assert!(ipxe(&srv, NEW).await.contains("kernel"), "confirmed: installed again");
        assert!(!ipxe(&srv, OLD).await.contains("kernel"), "the old MAC is nobody's now");
        admin.job_action(&id, "cancel").await.unwrap();

        let events = admin
            .list_events(&kiln_types::event::EventFilter {
                target: Some("racked1".into()),
                ..Default::default()
            })
            .await
            .unwrap();
        let seen: Vec<&str> = events.items.iter().map(|e| e.action.as_str()).collect();
        for want in ["machine.port_learned", "machine.port_flagged", "machine.port_confirmed"] {
            assert!(seen.contains(&want), "{want} not in {seen:?}");
        }
        let flagged = events
            .items
            .iter()
            .find(|e| e.action == "machine.port_flagged")
            .unwrap();
        assert!(
            flagged.actor.contains(PORT),
            "the event names the port: {}",
            flagged.actor
        );
    }
);
