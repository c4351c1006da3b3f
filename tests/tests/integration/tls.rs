//! AMQPS and the admin API over HTTPS, with certificates this file makes
//! (`wasmq_tests::pki`): lapin over TLS, a client that trusts another CA
//! refused, the `EXTERNAL` login from a client certificate's CN, a
//! certificate rotated on disk served to the next connection, HTTPS for
//! the admin API, and pika (RabbitMQ's Python client) over TLS with both
//! PLAIN and EXTERNAL.

use std::path::PathBuf;
use std::time::Duration;

use lapin::options::{BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Connection, ConnectionProperties, DefaultConnectionBuilder};
use wasmq::access::User;
use wasmq::tls::TlsSettings;
use wasmq_tests::pki::{self, Ca, Identity};
use wasmq_tests::{TestServer, declare_queue, eventually_async, reply_code};

/// The files of a broker's `[tls]` section, in a folder of their own.
struct Files {
    dir: tempfile::TempDir,
    ca: Ca,
}

impl Files {
    fn new(ca: Ca) -> Files {
        let dir = tempfile::tempdir().unwrap();
        let server = ca.server();
        pki::write(dir.path(), "server.pem", &server.cert);
        pki::write(dir.path(), "server.key", &server.key);
        pki::write(dir.path(), "ca.pem", &ca.pem());
        Files { dir, ca }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Settings for these files; `verify` names the CA file so clients are
    /// asked for certificates.
    fn settings(&self, verify: bool) -> TlsSettings {
        TlsSettings {
            cert_file: self.path("server.pem"),
            key_file: self.path("server.key"),
            ca_file: verify.then(|| self.path("ca.pem")),
            fail_if_no_peer_cert: false,
            watch: true,
        }
    }
}

async fn start(settings: TlsSettings, users: Option<Vec<User>>) -> TestServer {
    TestServer::start_with(|c| {
        c.tls = Some(settings);
        c.listen_tls = Some("127.0.0.1:0".parse().unwrap());
        if let Some(users) = users {
            c.users = users;
        }
    })
    .await
}

/// Connect over TLS trusting `ca`, as guest or (with `identity` and no
/// password) through EXTERNAL.
async fn connect(
    addr: std::net::SocketAddr,
    ca: &str,
    identity: Option<&Identity>,
    login: Option<(&str, &str)>,
) -> Result<Connection, lapin::Error> {
    let url = match login {
        Some((user, pass)) => format!("amqps://{user}:{pass}@127.0.0.1:{}/%2f", addr.port()),
        None => format!(
            "amqps://127.0.0.1:{}/%2f?auth_mechanism=external",
            addr.port()
        ),
    };
    let tls = lapin::tcp::OwnedTLSConfig {
        identity: identity.map(|i| lapin::tcp::OwnedIdentity::PKCS8 {
            pem: i.cert.clone().into_bytes(),
            key: i.key.clone().into_bytes(),
        }),
        cert_chain: Some(ca.to_owned()),
    };
    let builder = DefaultConnectionBuilder::new()?
        .with_uri_str(url)
        .with_properties(ConnectionProperties::default())
        .with_tls_config(tls);
    tokio::time::timeout(Duration::from_secs(10), builder.connect())
        .await
        .expect("a TLS connection attempt ends (either way) within 10 s")
}

/// Publish one confirmed message to `queue` and get it back.
async fn round_trip(conn: &Connection, queue: &str, body: &[u8]) {
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    declare_queue(&ch, queue).await;
    let confirm = ch
        .basic_publish(
            "".into(),
            queue.into(),
            BasicPublishOptions::default(),
            body,
            BasicProperties::default(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    assert!(confirm.is_ack(), "{confirm:?}");
    let got = ch
        .basic_get(queue.into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
        .expect("the message is in the queue");
    assert_eq!(got.delivery.data, body);
    // Closed here: lapin closes a dropped channel in the background, which
    // races a connection.close that follows at once.
    ch.close(200, "done".into()).await.unwrap();
}

fn user(name: &str, password: &str) -> User {
    let mut u = User::guest();
    u.name = name.into();
    u.password = password.into();
    u
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lapin_over_tls_and_the_admin_api_shows_it() {
    let files = Files::new(Ca::new("wasmq test CA"));
    let t = start(files.settings(false), None).await;
    let conn = connect(
        t.amqps_addr(),
        &files.ca.pem(),
        None,
        Some(("guest", "guest")),
    )
    .await
    .expect("lapin connects over TLS");
    // Large enough to span several TLS records and AMQP frames.
    let body: Vec<u8> = (0..300_000u32).map(|i| i as u8).collect();
    round_trip(&conn, "tls.q", &body).await;
    let conns = t.admin().get("/api/connections").unwrap();
    let c = &conns.as_array().unwrap()[0];
    assert_eq!(c["ssl"], true, "{c}");
    assert_eq!(c["ssl_protocol"], "TLSv1.3", "{c}");
    // The plain listener still serves, and says it is plain.
    let plain = t.connect().await;
    round_trip(&plain, "plain.q", b"plain").await;
    let conns = t.admin().get("/api/connections").unwrap();
    assert_eq!(
        conns
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c["ssl"] == false)
            .count(),
        1,
        "{conns}"
    );
    conn.close(200, "bye".into()).await.unwrap();
    plain.close(200, "bye".into()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_trusts_another_ca_is_refused() {
    let files = Files::new(Ca::new("wasmq test CA"));
    let t = start(files.settings(false), None).await;
    let other = Ca::new("some other CA");
    assert!(
        connect(t.amqps_addr(), &other.pem(), None, Some(("guest", "guest")))
            .await
            .is_err(),
        "a client that does not trust the server's CA must not connect"
    );
    // Plain AMQP on the TLS port is refused too, and the listener goes on.
    let mut raw = tokio::net::TcpStream::connect(t.amqps_addr())
        .await
        .unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    raw.write_all(b"AMQP\x00\x00\x09\x01").await.unwrap();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), raw.read_to_end(&mut buf)).await;
    assert!(
        read.is_ok() && !buf.starts_with(b"AMQP"),
        "plain AMQP on the TLS port gets no AMQP answer: {buf:?}"
    );
    let ok = connect(
        t.amqps_addr(),
        &files.ca.pem(),
        None,
        Some(("guest", "guest")),
    )
    .await
    .expect("the listener still serves");
    ok.close(200, "bye".into()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_login_takes_the_user_from_the_certificate_cn() {
    let files = Files::new(Ca::new("wasmq test CA"));
    let users = vec![User::guest(), user("app", "app-password")];
    let t = start(files.settings(true), Some(users)).await;
    let ca = files.ca.pem();
    let app = files.ca.client("app");
    let conn = connect(t.amqps_addr(), &ca, Some(&app), None)
        .await
        .expect("EXTERNAL login as the certificate's CN");
    round_trip(&conn, "ext.q", b"from app").await;
    let conns = t.admin().get("/api/connections").unwrap();
    let c = &conns.as_array().unwrap()[0];
    assert_eq!(c["user"], "app", "{c}");
    assert_eq!(c["peer_cert_subject"], "CN=app", "{c}");
    conn.close(200, "bye".into()).await.unwrap();

    // A verified certificate whose CN is no user: 403 at login.
    let stranger = files.ca.client("stranger");
    let err = connect(t.amqps_addr(), &ca, Some(&stranger), None)
        .await
        .expect_err("no user is called stranger");
    assert_eq!(reply_code(&err), Some(403), "{err:?}");
    // A certificate from another CA does not verify: refused at TLS.
    let forged = Ca::new("wasmq test CA").client("app");
    assert!(
        connect(t.amqps_addr(), &ca, Some(&forged), None)
            .await
            .is_err()
    );
    // Without a certificate EXTERNAL is not offered, but PLAIN still works
    // (fail_if_no_peer_cert is off).
    assert!(connect(t.amqps_addr(), &ca, None, None).await.is_err());
    let plain = connect(t.amqps_addr(), &ca, None, Some(("app", "app-password")))
        .await
        .expect("PLAIN over TLS without a client certificate");
    plain.close(200, "bye".into()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_if_no_peer_cert_refuses_clients_without_one() {
    let files = Files::new(Ca::new("wasmq test CA"));
    let mut settings = files.settings(true);
    settings.fail_if_no_peer_cert = true;
    let t = start(settings, None).await;
    let ca = files.ca.pem();
    assert!(
        connect(t.amqps_addr(), &ca, None, Some(("guest", "guest")))
            .await
            .is_err()
    );
    let guest = files.ca.client("guest");
    let conn = connect(t.amqps_addr(), &ca, Some(&guest), Some(("guest", "guest")))
        .await
        .expect("a client with a certificate connects");
    conn.close(200, "bye".into()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_rotated_on_disk_is_served_to_the_next_connection() {
    let files = Files::new(Ca::new("first CA"));
    let t = start(files.settings(false), None).await;
    let first = files.ca.pem();
    let open = connect(t.amqps_addr(), &first, None, Some(("guest", "guest")))
        .await
        .unwrap();

    // A broken rotation (a key that is not the certificate's) is refused;
    // the current certificate keeps serving.
    let stray = files.ca.server();
    pki::write(files.dir.path(), "server.key", &stray.key);
    tokio::time::sleep(Duration::from_millis(800)).await;
    let still = connect(t.amqps_addr(), &first, None, Some(("guest", "guest")))
        .await
        .expect("a bad key on disk leaves the served certificate in place");
    still.close(200, "bye".into()).await.unwrap();

    // The real rotation: a certificate from a new CA, and its key.
    let second = Ca::new("second CA");
    let next = second.server();
    pki::write(files.dir.path(), "server.pem", &next.cert);
    pki::write(files.dir.path(), "server.key", &next.key);
    let addr = t.amqps_addr();
    let mut rotated = None;
    for _ in 0..100 {
        if let Ok(c) = connect(addr, &second.pem(), None, Some(("guest", "guest"))).await {
            rotated = Some(c);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let rotated = rotated.expect("the new certificate is served within 10 s");
    round_trip(&rotated, "rotated.q", b"new cert").await;
    assert!(
        connect(addr, &first, None, Some(("guest", "guest")))
            .await
            .is_err(),
        "new connections no longer get the old certificate"
    );
    // The connection opened before the rotation keeps working.
    round_trip(&open, "before.q", b"old cert").await;
    open.close(200, "bye".into()).await.unwrap();
    rotated.close(200, "bye".into()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_over_https() {
    let files = Files::new(Ca::new("wasmq test CA"));
    let settings = files.settings(false);
    let t = TestServer::start_with(|c| {
        c.tls = Some(settings);
        c.admin.tls = true;
    })
    .await;
    let admin = t.server.as_ref().unwrap().admin_addr.unwrap();
    let ca = files.ca.pem();
    let overview = tokio::task::spawn_blocking(move || {
        let client = wasmq::admin::client::AdminClient::with_ca(
            &format!("https://127.0.0.1:{}", admin.port()),
            "guest",
            "guest",
            ca.as_bytes(),
        )
        .unwrap();
        let plain = wasmq::admin::client::AdminClient::new(
            &format!("http://127.0.0.1:{}", admin.port()),
            "guest",
            "guest",
        );
        (client.get("/api/overview"), plain.get("/api/overview"))
    })
    .await
    .unwrap();
    let doc = overview.0.expect("HTTPS with the CA works");
    assert!(doc["object_totals"].is_object(), "{doc}");
    assert!(overview.1.is_err(), "plain HTTP is not served");
    // With no AMQPS listener configured, none is opened.
    assert!(t.server.as_ref().unwrap().amqps_addr.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pika_over_tls_with_plain_and_external_logins() {
    let files = Files::new(Ca::new("wasmq test CA"));
    let users = vec![User::guest(), user("app", "app-password")];
    let t = start(files.settings(true), Some(users)).await;
    let client = files.ca.client("app");
    let cert = pki::write(files.dir.path(), "client.pem", &client.cert);
    let key = pki::write(files.dir.path(), "client.key", &client.key);
    let port = t.amqps_addr().port().to_string();
    let ca = files.path("ca.pem");
    wasmq_tests::run_pika_script(
        "pika_tls.py",
        [
            port.as_ref(),
            ca.as_os_str(),
            cert.as_os_str(),
            key.as_os_str(),
        ],
    )
    .await;
    assert!(
        eventually_async(Duration::from_secs(5), || t
            .broker()
            .connections()
            .is_empty())
        .await
    );
}
