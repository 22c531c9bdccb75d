//! TLS: serving it (self-signed or from -cert-path, reloaded on rotation) and speaking it to
//! prefillers and the decoder.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::support::*;
use http_body_util::BodyExt;
use hyper::Request;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use sidecar::security::tls::ClientTls;
use sidecar::upstream::Leg;
use sidecar::upstream::Upstream;

async fn get_status(client: &Upstream, url: &str) -> Result<u16, String> {
    let req = Request::get(url).body(sidecar::body::empty()).unwrap();
    match tokio::time::timeout(LIMIT, client.send(Leg::Decode, req)).await {
        Ok(Ok(resp)) => {
            let status = resp.status().as_u16();
            let _ = resp.into_body().collect().await;
            Ok(status)
        }
        Ok(Err(e)) => Err(sidecar::error::describe(&e)),
        Err(_) => Err("timeout".into()),
    }
}

#[tokio::test]
async fn secure_proxy_serves_tls_with_a_self_signed_certificate() {
    let d = sim(|_| {}).await;
    let mut cfg = config(d.api_addr());
    cfg.server_tls = Some(None);
    let sidecar = Sidecar::start(cfg).await;
    let url = format!("https://{}/v1/models", sidecar.addr);
    assert_eq!(get_status(&tls_client(insecure_tls()), &url).await, Ok(200));
    // Verification is on by default: a self-signed certificate is refused.
    let refused = get_status(&tls_client(ClientTls::default()), &url)
        .await
        .unwrap_err();
    assert!(refused.to_lowercase().contains("certificate"), "{refused}");
    // Plain HTTP to a TLS port gets nothing useful.
    assert!(get_status(
        &tls_client(insecure_tls()),
        &format!("http://{}/health", sidecar.addr)
    )
    .await
    .is_err());
}

#[tokio::test]
async fn prefill_and_decode_legs_speak_tls() {
    let p = sim(|_| {}).await;
    let d = sim(|_| {}).await;
    // TLS fronts for both workers: sidecars with -secure-proxy passing requests through.
    let front = |backend: std::net::SocketAddr| {
        let mut cfg = config(backend);
        cfg.server_tls = Some(None);
        // Its clients are the sidecar below: the transfer parameters it gets are that one's.
        cfg.trust_client_kv_params = true;
        Sidecar::start(cfg)
    };
    let p_front = front(p.api_addr()).await;
    let d_front = front(d.api_addr()).await;
    let mut cfg = config(d_front.addr);
    cfg.decoder = sidecar::upstream::Target::new(d_front.addr.to_string().parse().unwrap(), true);
    cfg.prefiller_use_tls = true;
    cfg.prefiller_tls = insecure_tls();
    cfg.decoder_tls = insecure_tls();
    let sidecar = Sidecar::start(cfg).await;
    let (resp, body) = call(
        sidecar.addr,
        post(
            "/v1/completions",
            Some(p_front.addr),
            r#"{"prompt":"tls","max_tokens":2}"#,
        ),
    )
    .await;
    assert_eq!(resp.status(), 200, "{}", String::from_utf8_lossy(&body));
    assert!(sim_wait(&p, "idle_and_no_leases", LIMIT).await);
    assert_eq!(counter(&sim_state(&p).await, "leases_pulled"), 1);
}

/// A CA and a `localhost` certificate it signed, as PEM files.
struct Pki {
    ca_pem: String,
    cert_pem: String,
    key_pem: String,
}

fn pki() -> Pki {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .signed_by(&key, &ca)
        .unwrap();
    Pki {
        ca_pem: ca.pem(),
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    }
}

fn scratch_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sidecar-test-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn install(dir: &Path, pki: &Pki) {
    // Write then rename, as Kubernetes swaps a mounted secret: never a half-written pair.
    for (name, text) in [("tls.key", &pki.key_pem), ("tls.crt", &pki.cert_pem)] {
        let tmp = dir.join(format!("{name}.tmp"));
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, dir.join(name)).unwrap();
    }
}

#[tokio::test]
async fn cert_path_is_served_and_reloaded_when_rotated() {
    let d = sim(|_| {}).await;
    let dir = scratch_dir("certs");
    let (first, second) = (pki(), pki());
    install(&dir, &first);
    let mut cfg = config(d.api_addr());
    cfg.server_tls = Some(Some(dir.clone()));
    cfg.cert_reload_interval = Duration::from_millis(50);
    let sidecar = Sidecar::start(cfg).await;
    let url = format!("https://localhost:{}/health", sidecar.addr.port());
    let trusting = |pki: &Pki, name: &str| {
        let ca = dir.join(name);
        std::fs::write(&ca, &pki.ca_pem).unwrap();
        tls_client(ClientTls {
            insecure_skip_verify: false,
            ca_file: Some(ca),
        })
    };
    let (old_ca, new_ca) = (trusting(&first, "ca1.pem"), trusting(&second, "ca2.pem"));
    assert_eq!(get_status(&old_ca, &url).await, Ok(200));
    assert!(get_status(&new_ca, &url).await.is_err());

    install(&dir, &second);
    // The reload has no outside signal: poll, bounded, until the new certificate is served.
    let deadline = tokio::time::Instant::now() + LIMIT;
    while get_status(&new_ca, &url).await.is_err() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the rotated certificate was never served"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A fresh connection (the pooled one keeps its session) no longer sees the old one.
    let old_ca = trusting(&first, "ca1-again.pem");
    assert!(
        get_status(&old_ca, &url).await.is_err(),
        "the old certificate is gone"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
