//! The `ferry` command: genconfig, check-config, show-config, token, the
//! environment, and configuration precedence (file < environment < flags).

use std::io::{BufRead, Read, Write};
use std::process::{Command, Stdio};

/// The binary with no `FERRY_*` variable inherited (a harness may export
/// `FERRY_BIN`), so each test sets exactly the ones it means.
fn ferry() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ferry"));
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("FERRY_")) {
        c.env_remove(k);
    }
    c.env("FERRY_LOG", "warn");
    c
}

/// A fresh data directory for one server.
fn temp_dir(name: &str) -> std::path::PathBuf {
    let p = std::env::temp_dir().join(format!("ferry-cli-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&p);
    p
}

/// Spawn `cmd` (a `ferry serve`) and read up to its two startup lines, fewer
/// if it exits first. Returns the lines read and the process, for [`stop`].
fn serve_startup(cmd: &mut Command) -> (Vec<String>, std::process::Child) {
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut lines = Vec::new();
    // Two startup lines at most; an early exit ends the read with EOF.
    for _ in 0..2 {
        let mut line = String::new();
        if out.read_line(&mut line).unwrap() == 0 {
            break;
        }
        lines.push(line);
    }
    (lines, child)
}

/// Stop a server and return what it wrote on stderr.
fn stop(mut child: std::process::Child) -> String {
    let _ = child.kill();
    let mut err = String::new();
    child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    let _ = child.wait();
    err
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
    let out = ferry().args(["show-config"]).env("FERRY_LIMITS_NO_SUCH_THING", "1").output().unwrap();
    assert!(!out.status.success(), "unknown fields of a section are refused, not ignored");
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

#[test]
fn show_config_redacts_secrets_unless_asked() {
    let gen = String::from_utf8(ferry().arg("genconfig").output().unwrap().stdout).unwrap();
    let cfg = ferry_server::config::Config::from_toml(&gen).unwrap();
    let secrets = [cfg.auth.hmac_secret.clone().unwrap(), cfg.api.keys[0].clone(), cfg.webhooks.secret.clone()];
    let path = temp_file("redact.toml", &gen);
    let out = ferry().args(["show-config", "--config"]).arg(&path).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    for s in &secrets {
        assert!(!text.contains(s.as_str()), "a secret is printed:\n{text}");
    }
    // Still TOML, and each set secret visibly set.
    let shown: toml::Table = toml::from_str(&text).unwrap();
    assert_eq!(shown["auth"]["hmac_secret"].as_str(), Some("<redacted>"));
    assert_eq!(shown["api"]["keys"].as_array().unwrap(), &vec![toml::Value::from("<redacted>")]);
    assert_eq!(shown["webhooks"]["secret"].as_str(), Some("<redacted>"));
    // An environment override is redacted too.
    let out = ferry()
        .args(["show-config", "--config"])
        .arg(&path)
        .env("FERRY_API_KEYS", r#"["env-key-1", "env-key-2"]"#)
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(!text.contains("env-key-"), "{text}");
    assert!(text.contains(r#"keys = ["<redacted>", "<redacted>"]"#), "{text}");
    // Unset secrets stay unset: no placeholder for what is not there.
    let out = ferry().arg("show-config").output().unwrap();
    let shown: toml::Table = toml::from_str(&String::from_utf8(out.stdout).unwrap()).unwrap();
    assert!(shown["auth"].get("hmac_secret").is_none());
    assert_eq!(shown["webhooks"]["secret"].as_str(), Some(""));
    // --show-secrets prints them as they are.
    let out = ferry().args(["show-config", "--show-secrets", "--config"]).arg(&path).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let shown = ferry_server::config::Config::from_toml(&String::from_utf8(out.stdout).unwrap()).unwrap();
    assert_eq!(shown.auth.hmac_secret.as_ref(), Some(&secrets[0]));
    assert_eq!(shown.api.keys, vec![secrets[1].clone()]);
    assert_eq!(shown.webhooks.secret, secrets[2]);
}

#[test]
fn token_refuses_a_secret_shorter_than_the_server_accepts() {
    let refused = |out: std::process::Output, names: &str| {
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(!out.status.success(), "signed with a short secret: {}", String::from_utf8_lossy(&out.stdout));
        assert!(out.stdout.is_empty(), "no token is printed");
        assert!(err.contains("must be at least 32 bytes") && err.contains(names), "{err}");
    };
    refused(ferry().args(["token", "--secret", "short", "--user", "42"]).output().unwrap(), "--secret");
    refused(ferry().args(["token", "--user", "42"]).env("FERRY_HMAC_SECRET", "short").output().unwrap(), "--secret");
    // One byte short of the minimum.
    let secret31 = "0123456789abcdef0123456789abcde";
    refused(ferry().args(["token", "--secret", secret31, "--user", "42"]).output().unwrap(), "--secret");
    let path = temp_file("short-secret.toml", "[auth]\nhmac_secret = \"short\"\n");
    refused(ferry().args(["token", "--user", "42", "--config"]).arg(&path).output().unwrap(), "auth.hmac_secret");
    // The server refuses the same file for the same reason.
    let out = ferry().arg("check-config").arg(&path).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("auth.hmac_secret must be at least 32 bytes"));
}

/// What Kubernetes injects into every pod for a Service named `ferry`
/// (with a port named `ws`).
const KUBERNETES: &[(&str, &str)] = &[
    ("FERRY_PORT", "tcp://10.0.0.1:8000"),
    ("FERRY_PORT_8000_TCP", "tcp://10.0.0.1:8000"),
    ("FERRY_PORT_8000_TCP_PROTO", "tcp"),
    ("FERRY_PORT_8000_TCP_PORT", "8000"),
    ("FERRY_PORT_8000_TCP_ADDR", "10.0.0.1"),
    ("FERRY_SERVICE_HOST", "10.0.0.1"),
    ("FERRY_SERVICE_PORT", "8000"),
    ("FERRY_SERVICE_PORT_WS", "8000"),
];

#[test]
fn kubernetes_service_links_and_foreign_variables_do_not_stop_the_server() {
    let dir = temp_dir("k8s");
    let mut cmd = ferry();
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--api-listen", "off", "--data-dir"])
        .arg(&dir)
        .envs(KUBERNETES.iter().copied())
        .env("FERRY_BIN", "/usr/local/bin/ferry")
        // A real field among them still applies.
        .env("FERRY_ALLOW_ANONYMOUS", "false");
    let (lines, child) = serve_startup(&mut cmd);
    let err = stop(child);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(lines.first().is_some_and(|l| l.starts_with("ferry listening on ws://127.0.0.1:")), "{lines:?}\n{err}");
    assert!(lines.get(1).is_some_and(|l| l.contains("anonymous access: off")), "{lines:?}");
    let warnings: Vec<&str> = err.lines().filter(|l| l.contains("FERRY_")).collect();
    assert_eq!(warnings.len(), 1, "one warning line:\n{err}");
    assert!(warnings[0].contains("WARN") && warnings[0].contains("FERRY_ENV_IGNORE"), "{}", warnings[0]);
    for name in KUBERNETES.iter().map(|(n, _)| n).chain(&["FERRY_BIN"]) {
        assert!(warnings[0].contains(&format!("{name},")) || warnings[0].contains(&format!("{name} ")), "{name}");
    }
    assert!(!warnings[0].contains("FERRY_ALLOW_ANONYMOUS"));
    // show-config too: clean TOML on stdout, the warning on stderr.
    let out = ferry()
        .arg("show-config")
        .envs(KUBERNETES.iter().copied())
        .env("FERRY_BIN", "/usr/local/bin/ferry")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    toml::from_str::<toml::Table>(&String::from_utf8(out.stdout).unwrap()).unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stderr).lines().count(), 1);
    // Listed in FERRY_ENV_IGNORE: ignored without a word, even under a section.
    let out = ferry()
        .arg("show-config")
        .env("FERRY_BIN", "/usr/local/bin/ferry")
        .env("FERRY_LIMITS_WRAPPER_FLAG", "1")
        .env("FERRY_ENV_IGNORE", "FERRY_BIN, FERRY_LIMITS_WRAPPER_FLAG")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.stderr.is_empty(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn an_unknown_field_of_a_known_section_still_stops_the_server() {
    let refused = |name: &str, value: &str, hint: &str| {
        let dir = temp_dir("typo");
        let mut cmd = ferry();
        cmd.args(["serve", "--listen", "127.0.0.1:0", "--api-listen", "off", "--data-dir"]).arg(&dir).env(name, value);
        let (lines, child) = serve_startup(&mut cmd);
        let err = stop(child);
        let _ = std::fs::remove_dir_all(&dir);
        assert!(lines.is_empty(), "{name} is ignored: {lines:?}");
        assert!(err.contains(&format!("{name}: no such configuration field")), "{err}");
        assert!(err.contains(hint), "{name}: no hint {hint:?} in {err}");
    };
    refused("FERRY_LIMITS_PING_INTERVL_MS", "20000", "did you mean FERRY_LIMITS_PING_INTERVAL_MS?");
    // A near miss of a section is meant as configuration too.
    refused("FERRY_LIMIT_PING_INTERVAL_MS", "20000", "did you mean FERRY_LIMITS_PING_INTERVAL_MS?");
    refused("FERRY_LISTEN_ADDR", "127.0.0.1:9", "did you mean FERRY_LISTEN?");
    refused("FERRY_DATA_DIRR", "/tmp/x", "did you mean FERRY_DATA_DIR?");
    // Shaped like a Kubernetes link by name only: a guess at a field.
    refused("FERRY_API_PORT", "8001", "FERRY_ENV_IGNORE");
    // A namespace the file does not define.
    refused("FERRY_NAMESPACES_CHAT_JOIN_LEAVE", "true", "a namespace must be in the configuration file");
}

/// One HTTP/1.1 request over loopback; the status and the body.
fn http(addr: &str, method: &str, path: &str, headers: &[String], body: &str) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(20))).unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for h in headers {
        req.push_str(&format!("{h}\r\n"));
    }
    req.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    s.write_all(req.as_bytes()).unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let status = raw.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or_else(|| panic!("{raw:?}"));
    (status, raw.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default())
}

/// Split a shell command line into words: '...' literal, "..." with `$VAR`
/// from `vars`, a word starting with `#` ends the line.
fn shell_words(line: &str, vars: &[(&str, &str)]) -> Vec<String> {
    let mut words = Vec::new();
    let mut cur: Option<String> = None;
    let mut chars = line.chars().peekable();
    let expand = |name: &str| -> String {
        vars.iter().find(|(k, _)| *k == name).map(|(_, v)| v.to_string()).unwrap_or_else(|| panic!("${name} in {line}"))
    };
    while let Some(c) = chars.next() {
        match c {
            ' ' | '\t' => words.extend(cur.take()),
            '#' if cur.is_none() => break,
            '\'' => {
                let w = cur.get_or_insert_with(String::new);
                w.extend(chars.by_ref().take_while(|c| *c != '\''));
            }
            '"' => {
                let w = cur.get_or_insert_with(String::new);
                while let Some(c) = chars.next() {
                    match c {
                        '"' => break,
                        '$' => {
                            let mut name = String::new();
                            while let Some(c) = chars.next_if(|c| c.is_ascii_alphanumeric() || *c == '_') {
                                name.push(c);
                            }
                            w.push_str(&expand(&name));
                        }
                        c => w.push(c),
                    }
                }
            }
            c => cur.get_or_insert_with(String::new).push(c),
        }
    }
    words.extend(cur);
    words
}

#[test]
fn readme_api_examples_work_against_a_genconfig_server() {
    let gen = String::from_utf8(ferry().arg("genconfig").output().unwrap().stdout).unwrap();
    let key = ferry_server::config::Config::from_toml(&gen).unwrap().api.keys[0].clone();
    let path = temp_file("readme.toml", &gen);
    let dir = temp_dir("readme");
    let mut cmd = ferry();
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--api-listen", "127.0.0.1:0", "--config"])
        .arg(&path)
        .arg("--data-dir")
        .arg(&dir);
    let (lines, child) = serve_startup(&mut cmd);
    let api = lines
        .get(1)
        .and_then(|l| l.strip_prefix("api: http://"))
        .and_then(|l| l.split('/').next())
        .unwrap_or_else(|| panic!("no API address in {lines:?}"))
        .to_string();
    // The curl commands of "Publishing from your backend", lines joined.
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    let section = readme.split("## Publishing from your backend").nth(1).unwrap().split("\n## ").next().unwrap();
    let joined = section.replace("\\\n", " ");
    let curls: Vec<Vec<String>> = joined
        .lines()
        .filter(|l| l.trim_start().starts_with("curl "))
        .map(|l| shell_words(l, &[("KEY", &key)]))
        .collect();
    let mut answers = Vec::new();
    for words in &curls {
        let (mut method, mut headers, mut body, mut url) = ("GET".to_string(), Vec::new(), String::new(), None);
        let mut w = words[1..].iter();
        while let Some(a) = w.next() {
            match a.as_str() {
                "-s" => {}
                "-X" => method = w.next().unwrap().clone(),
                "-H" => headers.push(w.next().unwrap().clone()),
                "-d" => body = w.next().unwrap().clone(),
                u if u.starts_with("http://127.0.0.1:8001/") => {
                    url = Some(u["http://127.0.0.1:8001".len()..].to_string())
                }
                other => panic!("curl argument {other:?} not understood"),
            }
        }
        answers.push((words.join(" "), http(&api, &method, &url.expect("a URL"), &headers, &body)));
    }
    let _ = stop(child);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(curls.len() >= 2, "the publish and history examples: {curls:?}");
    for (cmd, (status, body)) in answers {
        assert_eq!(status, 200, "{cmd}\n{body}");
    }
}

#[test]
fn serve_raises_its_open_file_limit_to_the_hard_limit() {
    // One descriptor per connection: a soft limit of 256 would cap the
    // server at a few hundred clients. `prlimit` starts it with 256 of 4096.
    let dir = temp_dir("nofile");
    let mut cmd = Command::new("prlimit");
    cmd.args(["--nofile=256:4096", "--"]).arg(env!("CARGO_BIN_EXE_ferry"));
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("FERRY_")) {
        cmd.env_remove(k);
    }
    cmd.env("FERRY_LOG", "warn")
        .args(["serve", "--listen", "127.0.0.1:0", "--api-listen", "off", "--data-dir"])
        .arg(&dir);
    let (lines, child) = serve_startup(&mut cmd);
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", child.id())).unwrap_or_default();
    let err = stop(child);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(lines.get(1).is_some_and(|l| l.contains("open files: 4096")), "{lines:?}\n{err}");
    let soft = limits.lines().find(|l| l.starts_with("Max open files")).and_then(|l| l.split_whitespace().nth(3));
    assert_eq!(soft, Some("4096"), "{limits}");
}
