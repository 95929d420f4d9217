//! Reaching PostgreSQL from a container without network (docs/network-policy.md).
//!
//! The supervisor forwards each granted `host:port` through a Unix socket, listed in
//! `DATIVO_NETWORK` as `host:port=/run/dativo/net/<host>/.s.PGSQL.<port>;...`. The reader opens
//! that socket and runs the PostgreSQL protocol over it with `Config::connect_raw`: in clear
//! with `sslmode: disable`, otherwise after negotiating TLS over the socket itself (rustls,
//! certificates checked against the real host name and the Mozilla roots), so the forwarder
//! only ever sees ciphertext.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::UnixStream;
use tokio_postgres::config::SslMode as PgSslMode;
use tokio_postgres::error::SqlState;
use tokio_postgres::tls::MakeTlsConnect;
use tokio_postgres::{Client, NoTls};
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::config::{Config, SslMode};
use crate::error::ReadError;

/// The Unix socket forwarding `destination`, from a `DATIVO_NETWORK` value.
pub fn granted_socket(network: Option<&str>, destination: &str) -> Option<String> {
    let wanted = destination.to_ascii_lowercase();
    network?.split(';').find_map(|entry| {
        let (granted, path) = entry.split_once('=')?;
        (granted.trim().to_ascii_lowercase() == wanted).then(|| path.trim().to_string())
    })
}

fn not_granted(destination: &str) -> ReadError {
    ReadError::config(format!(
        "host:port {destination} is not granted; add it to the reader's network: [{destination}]"
    ))
}

/// Connects and logs in; the connection's I/O runs as a task of the current runtime.
pub async fn connect(config: &Config) -> Result<Client, ReadError> {
    let destination = config.destination();
    let network = std::env::var("DATIVO_NETWORK").ok();
    let socket = granted_socket(network.as_deref(), &destination)
        .ok_or_else(|| not_granted(&destination))?;
    let timeout = Duration::from_secs(config.connect_timeout);
    match tokio::time::timeout(timeout, login(config, &socket)).await {
        Ok(result) => result,
        Err(_) => Err(ReadError::source(format!(
            "cannot connect to PostgreSQL at {destination}: no answer within {} s \
             (connect_timeout)",
            config.connect_timeout
        ))
        .transient()),
    }
}

fn pg_config(config: &Config) -> tokio_postgres::Config {
    let mut pg = tokio_postgres::Config::new();
    pg.user(&config.user)
        .dbname(&config.database)
        .application_name(&config.application_name)
        .ssl_mode(match config.sslmode {
            SslMode::Disable => PgSslMode::Disable,
            SslMode::Prefer => PgSslMode::Prefer,
            SslMode::Require => PgSslMode::Require,
        });
    if let Some(password) = &config.password {
        pg.password(password);
    }
    pg
}

async fn login(config: &Config, socket: &str) -> Result<Client, ReadError> {
    let destination = config.destination();
    let stream = UnixStream::connect(socket).await.map_err(|e| {
        ReadError::source(format!(
            "cannot connect to PostgreSQL at {destination}: {e}"
        ))
        .transient()
    })?;
    let pg = pg_config(config);
    let client = if config.sslmode == SslMode::Disable {
        let (client, connection) = pg
            .connect_raw(stream, NoTls)
            .await
            .map_err(|e| login_error(config, e))?;
        tokio::spawn(connection);
        client
    } else {
        let host = config.host.trim_start_matches('[').trim_end_matches(']');
        let tls = MakeTlsConnect::<UnixStream>::make_tls_connect(&mut rustls_connector(), host)
            .map_err(|e| ReadError::config(format!("`host` {host} cannot be used for TLS: {e}")))?;
        let (client, connection) = pg
            .connect_raw(stream, tls)
            .await
            .map_err(|e| login_error(config, e))?;
        tokio::spawn(connection);
        client
    };
    Ok(client)
}

fn rustls_connector() -> MakeRustlsConnect {
    let roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("ring supports the default TLS versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    MakeRustlsConnect::new(tls)
}

/// The documented message for each way a login fails.
fn login_error(config: &Config, e: tokio_postgres::Error) -> ReadError {
    let destination = config.destination();
    if let Some(db) = e.as_db_error() {
        let code = db.code();
        if *code == SqlState::INVALID_PASSWORD
            || *code == SqlState::INVALID_AUTHORIZATION_SPECIFICATION
        {
            return ReadError::source(format!(
                "PostgreSQL at {destination} refused the login of user \"{}\": {}",
                config.user,
                db.message()
            ));
        }
        if *code == SqlState::INVALID_CATALOG_NAME {
            return ReadError::source(format!(
                "database \"{}\" does not exist on {destination}",
                config.database
            ));
        }
        let transient = *code == SqlState::TOO_MANY_CONNECTIONS
            || *code == SqlState::CANNOT_CONNECT_NOW
            || code.code().starts_with("08");
        let error = ReadError::source(format!(
            "PostgreSQL at {destination} refused the connection: {}",
            db.message()
        ));
        return if transient { error.transient() } else { error };
    }
    let text = e.to_string();
    if text.contains("password missing") {
        return ReadError::config(format!(
            "PostgreSQL at {destination} asks user \"{}\" for a password: set `password: ${{ENV_VAR}}`",
            config.user
        ));
    }
    if text.contains("server does not support TLS") {
        return ReadError::source(format!(
            "PostgreSQL at {destination} does not offer TLS, which `sslmode: require` demands; \
             enable TLS on the server or set `sslmode: prefer`"
        ));
    }
    if text.contains("error performing TLS handshake") {
        let reason = std::error::Error::source(&e)
            .map(|s| s.to_string())
            .unwrap_or(text);
        return ReadError::source(format!(
            "TLS with PostgreSQL at {destination} failed: {reason} (the certificate must be valid \
             for the host name `{}`)",
            config.host
        ));
    }
    let reason = match std::error::Error::source(&e) {
        Some(cause) => format!("{text}: {cause}"),
        None => text,
    };
    ReadError::source(format!(
        "cannot connect to PostgreSQL at {destination}: {reason}"
    ))
    .transient()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn granted_sockets() {
        let env = "db.example.com:5432=/run/dativo/net/db.example.com/.s.PGSQL.5432;\
                   10.0.0.7:6432=/run/dativo/net/10.0.0.7/.s.PGSQL.6432";
        assert_eq!(
            granted_socket(Some(env), "DB.example.com:5432").as_deref(),
            Some("/run/dativo/net/db.example.com/.s.PGSQL.5432")
        );
        assert_eq!(
            granted_socket(Some(env), "10.0.0.7:6432").as_deref(),
            Some("/run/dativo/net/10.0.0.7/.s.PGSQL.6432")
        );
        assert_eq!(granted_socket(Some(env), "10.0.0.7:5432"), None);
        assert_eq!(granted_socket(None, "db:5432"), None);
        assert_eq!(
            not_granted("db:5432").message,
            "host:port db:5432 is not granted; add it to the reader's network: [db:5432]"
        );
    }
}
