//! The API server's security as kubectl meets it: `weft server` over TLS with certificates a
//! CA issued (weft-pki), an admin's token in the kubeconfig it writes, static tokens and client
//! certificates, node authorization, and refusals as Kubernetes `Status` (401 without or with
//! a bad credential, 403 with kube-apiserver's message, 413 for an oversize body, 400 for a
//! malformed one, 504 for a request that takes longer than `--request-timeout`, 429 beyond
//! `--max-mutating-requests-inflight`) that leave the server serving. Runs on the machine's
//! loopback only.

use std::{
    io::Write as _,
    path::{Path, PathBuf},
    process::{Child, Command, Output},
    time::{Duration, Instant},
};

use weft_pki::{Ca, Subject, Usage};
use weft_tests::weft_binary;

struct Server {
    child: Child,
    dir: PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn kubectl(kubeconfig: &Path, args: &[&str], stdin: Option<&str>) -> Output {
    let mut cmd = Command::new("kubectl");
    cmd.env("KUBECONFIG", kubeconfig).args(args);
    match stdin {
        Some(text) => weft_tests::output_with_stdin(cmd, text.as_bytes()),
        None => cmd.output().unwrap(),
    }
}

/// kubectl's stdout, asserting success.
fn ok(out: Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// kubectl's stderr, asserting failure.
fn refused(out: Output, what: &str) -> String {
    assert!(!out.status.success(), "{what} was allowed");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A kubeconfig for `server` trusting `ca`, with the user's fields given as YAML lines.
fn kubeconfig(dir: &Path, name: &str, server: &str, ca: &Path, user: &str) -> PathBuf {
    write(
        dir,
        name,
        &format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: {server}\n    certificate-authority: {}\n\
             contexts:\n- name: c\n  context:\n    cluster: c\n    user: u\ncurrent-context: c\nusers:\n- name: u\n  user:\n{user}",
            ca.display()
        ),
    )
}

#[test]
fn tls_tokens_certificates_and_node_authorization() {
    let dir = std::env::temp_dir().join(format!("weft-auth-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ca = Ca::generate("test-ca").unwrap();
    let serving = ca
        .issue(
            &Subject::new("kube-apiserver", &[]),
            &["127.0.0.1".to_owned()],
            Usage::Server,
        )
        .unwrap();
    let n2 = ca
        .issue(
            &Subject::new("system:node:n2", &["system:nodes"]),
            &[],
            Usage::Client,
        )
        .unwrap();
    // A certificate from another CA names nobody the server trusts.
    let stranger = Ca::generate("other-ca")
        .unwrap()
        .issue(
            &Subject::new("weft:admin", &["system:masters"]),
            &[],
            Usage::Client,
        )
        .unwrap();
    let ca_file = write(&dir, "ca.crt", &ca.cert_pem());
    let tokens = write(
        &dir,
        "tokens.csv",
        "n1-token,system:node:n1,u1,system:nodes\nbob-token,bob,u2\n",
    );
    let admin = dir.join("admin.kubeconfig");
    write(&dir, "apiserver.crt", &serving.cert_pem);
    write(&dir, "apiserver.key", &serving.key_pem);
    let child = start(&dir, &tokens, &admin, "127.0.0.1:0");
    let _server = Server {
        child,
        dir: dir.clone(),
    };
    started(&admin);
    let text = std::fs::read_to_string(&admin).unwrap();
    let server = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("server: "))
        .unwrap()
        .to_owned();
    assert!(server.starts_with("https://127.0.0.1:"), "{server}");
    use std::os::unix::fs::PermissionsExt as _;
    assert_eq!(
        std::fs::metadata(&admin).unwrap().permissions().mode() & 0o777,
        0o600,
        "the admin's kubeconfig is private"
    );

    // The admin's kubeconfig works over TLS, and the server's own certificate is verified.
    let answer = ok(
        kubectl(&admin, &["get", "namespace", "default", "-o", "name"], None),
        "admin get",
    );
    assert_eq!(answer.trim(), "namespace/default");

    // No credentials, a bad token, a certificate of another CA: 401.
    // (kubectl without credentials asks for a user name on a 401, as with kube-apiserver.)
    let curl = |path: &str| {
        let out = Command::new("curl")
            .args(["-s", "--cacert"])
            .arg(&ca_file)
            .args(["-w", "\n%{http_code}"])
            .arg(format!("{server}{path}"))
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let answer = curl("/api/v1/pods");
    assert!(
        answer.ends_with("\n401") && answer.contains(r#""reason":"Unauthorized""#),
        "{answer}"
    );
    let bad = kubeconfig(&dir, "bad", &server, &ca_file, "    token: nope\n");
    let e = refused(kubectl(&bad, &["get", "pods"], None), "a bad token");
    assert!(e.contains("Unauthorized"), "{e}");
    let strange = kubeconfig(
        &dir,
        "stranger",
        &server,
        &ca_file,
        &format!(
            "    client-certificate: {}\n    client-key: {}\n",
            write(&dir, "s.crt", &stranger.cert_pem).display(),
            write(&dir, "s.key", &stranger.key_pem).display()
        ),
    );
    let e = refused(
        kubectl(&strange, &["get", "pods"], None),
        "another CA's cert",
    );
    assert!(!e.is_empty());
    // Health needs nothing.
    assert_eq!(curl("/readyz"), "ok\n200");

    // An authenticated user without rights: 403 with kube-apiserver's message.
    let bob = kubeconfig(&dir, "bob", &server, &ca_file, "    token: bob-token\n");
    let e = refused(kubectl(&bob, &["get", "pods"], None), "bob");
    assert!(
        e.contains(r#"pods is forbidden: User "bob" cannot list resource "pods" in API group "" in the namespace "default""#),
        "{e}"
    );

    // A node (token) registers and updates itself, not another node.
    let n1 = kubeconfig(&dir, "n1", &server, &ca_file, "    token: n1-token\n");
    let node = |name: &str| {
        format!(r#"{{"apiVersion": "v1", "kind": "Node", "metadata": {{"name": "{name}"}}}}"#)
    };
    ok(
        kubectl(&n1, &["create", "-f", "-"], Some(&node("n1"))),
        "n1 registers",
    );
    let e = refused(
        kubectl(&n1, &["create", "-f", "-"], Some(&node("n2"))),
        "n1 registers n2",
    );
    assert!(e.contains("cannot modify node"), "{e}");
    ok(
        kubectl(&admin, &["create", "-f", "-"], Some(&node("n2"))),
        "the admin registers n2",
    );
    let ready = r#"{"status": {"conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady"}]}}"#;
    let patch_status = |who: &Path, name: &str| {
        kubectl(
            who,
            &[
                "patch",
                "node",
                name,
                "--subresource=status",
                "--type=merge",
                "-p",
                ready,
            ],
            None,
        )
    };
    ok(patch_status(&n1, "n1"), "n1 patches its status");
    let e = refused(patch_status(&n1, "n2"), "n1 patches n2's status");
    assert!(
        e.contains(r#"User "system:node:n1" cannot patch resource "nodes/status""#),
        "{e}"
    );
    let e = refused(
        kubectl(&n1, &["delete", "node", "n1"], None),
        "n1 deletes itself",
    );
    assert!(e.contains("Forbidden") || e.contains("forbidden"), "{e}");
    let e = refused(kubectl(&n1, &["get", "secrets"], None), "n1 lists secrets");
    assert!(e.contains("forbidden"), "{e}");
    // It reads what its pods need.
    ok(kubectl(&n1, &["get", "nodes"], None), "n1 lists nodes");

    // A node (client certificate) updates itself.
    let n2c = kubeconfig(
        &dir,
        "n2",
        &server,
        &ca_file,
        &format!(
            "    client-certificate: {}\n    client-key: {}\n",
            write(&dir, "n2.crt", &n2.cert_pem).display(),
            write(&dir, "n2.key", &n2.key_pem).display()
        ),
    );
    ok(
        patch_status(&n2c, "n2"),
        "n2 (certificate) patches its status",
    );
    refused(patch_status(&n2c, "n1"), "n2 patches n1's status");

    // Everyone may ask who they are and what they may do, answered by the same authorizer.
    let me = ok(kubectl(&n2c, &["auth", "whoami"], None), "n2 whoami");
    assert!(
        me.contains("system:node:n2") && me.contains("system:nodes"),
        "{me}"
    );
    let me = ok(
        kubectl(&bob, &["auth", "whoami", "-o", "json"], None),
        "bob whoami",
    );
    assert!(me.contains(r#""username": "bob""#), "{me}");
    let can = |who: &Path, args: &[&str]| {
        let mut all = vec!["auth", "can-i"];
        all.extend_from_slice(args);
        let out = kubectl(who, &all, None);
        let said = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        (out.status.success(), said)
    };
    assert_eq!(
        can(&n1, &["patch", "node/n1", "--subresource=status"]),
        (true, "yes".to_owned())
    );
    let (allowed, said) = can(&n1, &["patch", "node/n2", "--subresource=status"]);
    assert!(!allowed && said.starts_with("no"), "{said}");
    assert_eq!(can(&n1, &["create", "events"]), (true, "yes".to_owned()));
    let (allowed, said) = can(&bob, &["list", "pods"]);
    assert!(!allowed && said.starts_with("no"), "{said}");
    assert_eq!(can(&admin, &["delete", "nodes"]), (true, "yes".to_owned()));
    assert_eq!(
        can(&bob, &["get", "/healthz"]),
        (true, "yes".to_owned()),
        "a non-resource URL"
    );

    // An oversize body (413) and a malformed one (400) are refused; the server goes on.
    let big = write(&dir, "big", &"x".repeat(4 * 1024 * 1024));
    let raw_create = |file: &Path| {
        Command::new("kubectl")
            .env("KUBECONFIG", &admin)
            .args([
                "create",
                "--raw",
                "/api/v1/namespaces/default/configmaps",
                "-f",
            ])
            .arg(file)
            .output()
            .unwrap()
    };
    let e = refused(raw_create(&big), "an oversize body");
    assert!(
        e.contains("RequestEntityTooLarge") || e.contains("too large"),
        "{e}"
    );
    let malformed = write(
        &dir,
        "malformed.json",
        "{\"apiVersion\": \"v1\", \"kind\": ",
    );
    let e = refused(raw_create(&malformed), "a malformed body");
    assert!(
        e.contains("not valid JSON") || e.contains("BadRequest"),
        "{e}"
    );
    // A client that is not TLS at all.
    let addr = server.trim_start_matches("https://");
    let mut raw = std::net::TcpStream::connect(addr).unwrap();
    let _ = raw.write_all(b"GET /api HTTP/1.1\r\nHost: x\r\n\r\n");
    drop(raw);
    let answer = ok(
        kubectl(&admin, &["get", "nodes", "-o", "name"], None),
        "after the refusals",
    );
    assert_eq!(answer.lines().count(), 2, "{answer}");

    // The admin's token survives a restart while its kubeconfig stays.
    let mut server_proc = _server;
    let _ = server_proc.child.kill();
    let _ = server_proc.child.wait();
    let port = addr.rsplit(':').next().unwrap();
    server_proc.child = start(&dir, &tokens, &admin, &format!("127.0.0.1:{port}"));
    answers(&admin, "the admin's kubeconfig after a restart");
}

/// Waits until the server has written `kubeconfig` (it does once it serves).
fn started(kubeconfig: &Path) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !kubeconfig.exists() {
        assert!(Instant::now() < deadline, "weft server did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until kubectl with `kubeconfig` reads the default namespace.
fn answers(kubeconfig: &Path, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let out = kubectl(
            kubeconfig,
            &["get", "namespace", "default", "-o", "name"],
            None,
        );
        if out.status.success() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `weft server` on `listen` with the test's certificates in `dir`.
fn start(dir: &Path, tokens: &Path, kubeconfig: &Path, listen: &str) -> Child {
    Command::new(weft_binary("weft"))
        .args(["server", "--listen", listen, "--controllers=false"])
        .arg("--tls-cert-file")
        .arg(dir.join("apiserver.crt"))
        .arg("--tls-private-key-file")
        .arg(dir.join("apiserver.key"))
        .arg("--client-ca-file")
        .arg(dir.join("ca.crt"))
        .arg("--token-auth-file")
        .arg(tokens)
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .spawn()
        .unwrap()
}

#[test]
fn without_a_certificate_the_server_makes_its_own_and_keeps_it_in_cert_dir() {
    let dir = std::env::temp_dir().join(format!("weft-auth-self-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let kubeconfig = dir.join("kubeconfig");
    let start = |listen: &str| {
        Command::new(weft_binary("weft"))
            .args(["server", "--listen", listen, "--controllers=false"])
            .arg("--cert-dir")
            .arg(dir.join("pki"))
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .spawn()
            .unwrap()
    };
    let mut server = Server {
        child: start("127.0.0.1:0"),
        dir: dir.clone(),
    };
    started(&kubeconfig);
    answers(&kubeconfig, "a self-signed server");
    let text = std::fs::read_to_string(&kubeconfig).unwrap();
    assert!(
        text.contains("server: https://127.0.0.1:") && text.contains("certificate-authority-data")
    );
    for f in ["ca.crt", "apiserver.crt", "apiserver.key"] {
        assert!(dir.join("pki").join(f).exists(), "{f} kept");
    }
    // Restarted on the same port, it serves the same certificate: a copy of the kubeconfig
    // taken before (the server rewrites its own) still works.
    let before = dir.join("kubeconfig.before");
    std::fs::copy(&kubeconfig, &before).unwrap();
    let port = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("server: https://127.0.0.1:"))
        .unwrap()
        .to_owned();
    let _ = server.child.kill();
    let _ = server.child.wait();
    server.child = start(&format!("127.0.0.1:{port}"));
    answers(&before, "after a restart");
}

/// A TLS connection to the server at `addr` (`127.0.0.1:<port>`), trusting `ca_pem`.
fn tls_to(
    addr: &str,
    ca_pem: &[u8],
) -> rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream> {
    let config = weft_pki::client_config(ca_pem, None).unwrap();
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1".to_owned()).unwrap();
    let conn = rustls::ClientConnection::new(std::sync::Arc::new(config), name).unwrap();
    let tcp = std::net::TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    rustls::StreamOwned::new(conn, tcp)
}

/// Starts a POST of a ConfigMap whose body never finishes arriving.
fn stalled_write(
    addr: &str,
    ca_pem: &[u8],
    token: &str,
) -> rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream> {
    let mut s = tls_to(addr, ca_pem);
    write!(
        s,
        "POST /api/v1/namespaces/default/configmaps HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"metadata\":"
    )
    .unwrap();
    s.flush().unwrap();
    s
}

/// The status line and the rest of a response read from `s`.
fn response(s: &mut impl std::io::Read) -> (String, String) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
        let text = String::from_utf8_lossy(&buf);
        if text.contains("\r\n\r\n") && text.contains("\"kind\":\"Status\"") && text.ends_with('}')
        {
            break;
        }
    }
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (line, rest) = text.split_once("\r\n").unwrap_or((&text, ""));
    (line.to_owned(), rest.to_owned())
}

#[test]
fn a_slow_request_times_out_and_writes_beyond_the_limit_wait_their_turn() {
    let dir = std::env::temp_dir().join(format!("weft-auth-limits-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let kubeconfig = dir.join("kubeconfig");
    let child = Command::new(weft_binary("weft"))
        .args(["server", "--listen", "127.0.0.1:0", "--controllers=false"])
        .args(["--request-timeout=2s", "--max-mutating-requests-inflight=2"])
        .arg("--cert-dir")
        .arg(dir.join("pki"))
        .arg("--kubeconfig")
        .arg(&kubeconfig)
        .spawn()
        .unwrap();
    let _server = Server {
        child,
        dir: dir.clone(),
    };
    started(&kubeconfig);
    answers(&kubeconfig, "the server");
    let text = std::fs::read_to_string(&kubeconfig).unwrap();
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(name))
            .unwrap()
            .trim()
            .to_owned()
    };
    let addr = field("server: https://");
    let token = field("token:");
    let ca = std::fs::read(dir.join("pki").join("ca.crt")).unwrap();

    // Two writes whose bodies never come hold both write slots: a third is told to come back
    // (429 with Retry-After), reads still go on.
    let mut slow: Vec<_> = (0..2).map(|_| stalled_write(&addr, &ca, &token)).collect();
    std::thread::sleep(Duration::from_millis(300));
    let mut third = stalled_write(&addr, &ca, &token);
    let (line, rest) = response(&mut third);
    assert!(line.contains(" 429 "), "{line}\n{rest}");
    assert!(
        rest.to_ascii_lowercase().contains("retry-after: 1"),
        "{rest}"
    );
    assert!(rest.contains("\"reason\":\"TooManyRequests\""), "{rest}");
    answers(&kubeconfig, "reads while the write slots are taken");
    // The stalled ones end with 504 Timeout once --request-timeout has passed.
    for s in &mut slow {
        let (line, rest) = response(s);
        assert!(line.contains(" 504 "), "{line}\n{rest}");
        assert!(rest.contains("\"reason\":\"Timeout\""), "{rest}");
    }
    // The slots are free again.
    let created = ok(
        kubectl(
            &kubeconfig,
            &["create", "configmap", "after", "--from-literal=k=v"],
            None,
        ),
        "a write after the timeouts",
    );
    assert!(created.contains("configmap/after created"), "{created}");
}
