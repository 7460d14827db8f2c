//! The `ferry` command: genconfig, check-config, token, and configuration
//! precedence (file < environment < flags).

use std::process::Command;

fn ferry() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ferry"));
    c.env("FERRY_LOG", "warn");
    c
}

fn temp_file(name: &str, text: &str) -> std::path::PathBuf {
    let p = std::env::temp_dir().join(format!("ferry-cli-{}-{name}", std::process::id()));
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn genconfig_writes_a_valid_config_with_fresh_secrets() {
    let a = ferry().arg("genconfig").output().unwrap();
    let b = ferry().arg("genconfig").output().unwrap();
    assert!(a.status.success());
    let a = String::from_utf8(a.stdout).unwrap();
    let b = String::from_utf8(b.stdout).unwrap();
    assert_ne!(a, b, "secrets are fresh each time");
    let path = temp_file("gen.toml", &a);
    let check = ferry().arg("check-config").arg(&path).output().unwrap();
    assert!(check.status.success(), "{}", String::from_utf8_lossy(&check.stderr));
    let cfg = ferry_server::config::Config::from_toml(&a).unwrap();
    assert!(cfg.auth.hmac_secret.as_ref().is_some_and(|s| s.len() >= 32));
    assert!(!cfg.allow_anonymous);
    // A bad file is refused with the reason.
    let bad = temp_file("bad.toml", "[limits]\nping_interval_ms = 0\n");
    let out = ferry().arg("check-config").arg(&bad).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("ping_interval_ms"));
}

#[test]
fn file_then_environment_then_flags() {
    let path =
        temp_file("prec.toml", "listen = \"127.0.0.1:1\"\n[limits]\nping_interval_ms = 1111\npong_timeout_ms = 3333\n");
    let out = ferry()
        .args(["show-config", "--config"])
        .arg(&path)
        .env("FERRY_LIMITS_PING_INTERVAL_MS", "2222")
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("ping_interval_ms = 2222"), "environment beats the file:\n{text}");
    assert!(text.contains("pong_timeout_ms = 3333"), "the file beats defaults");
    let out = ferry().args(["show-config"]).env("FERRY_NO_SUCH_THING", "1").output().unwrap();
    assert!(!out.status.success(), "unknown variables are refused, not ignored");
    // A flag beats both: the file and environment say port 1, the flag an ephemeral one.
    let dir = std::env::temp_dir().join(format!("ferry-cli-data-{}", std::process::id()));
    let mut child = ferry()
        .args(["serve", "--config"])
        .arg(&path)
        .env("FERRY_LISTEN", "127.0.0.1:2")
        .args(["--listen", "127.0.0.1:0", "--api-listen", "off", "--data-dir"])
        .arg(&dir)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::BufRead;
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(line.starts_with("ferry listening on ws://127.0.0.1:"), "{line}");
    assert!(!line.contains("127.0.0.1:1/") && !line.contains("127.0.0.1:2/"), "{line}");
}

#[test]
fn token_command_signs_a_token_the_server_accepts() {
    let secret = "0123456789abcdef0123456789abcdef";
    let out = ferry().args(["token", "--secret", secret, "--user", "42", "--ttl", "60"]).output().unwrap();
    assert!(out.status.success());
    let token = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let auth = ferry_server::auth::Auth::from_config(
        &ferry_server::config::AuthConfig { hmac_secret: Some(secret.into()), ..Default::default() },
        false,
    )
    .unwrap();
    let id = auth.verify(&token).unwrap();
    assert_eq!(id.user, "42");
    assert!(id.expires_at.is_some());
}

#[test]
fn check_config_reads_the_tls_files() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tls");
    let good = temp_file("tls-good.toml", &format!("[tls]\ncert = \"{dir}/server.pem\"\nkey = \"{dir}/server.key\"\n"));
    let out = ferry().arg("check-config").arg(&good).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let half = temp_file("tls-half.toml", &format!("[tls]\ncert = \"{dir}/server.pem\"\n"));
    let out = ferry().arg("check-config").arg(&half).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("tls.cert and tls.key go together"));
    let missing = temp_file("tls-missing.toml", "[tls]\ncert = \"/nonexistent/c.pem\"\nkey = \"/nonexistent/k.pem\"\n");
    let out = ferry().arg("check-config").arg(&missing).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/c.pem"));
    // A key that is not a key: refused with the field named.
    let wrong = temp_file("tls-wrong.toml", &format!("[tls]\ncert = \"{dir}/server.pem\"\nkey = \"{dir}/ca.pem\"\n"));
    let out = ferry().arg("check-config").arg(&wrong).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("tls.key"), "{}", String::from_utf8_lossy(&out.stderr));
}
