//! The rustls side of the QUIC client: always the `ring` provider, always TLS 1.3.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use tracing::warn;

use super::config::{QuicConfig, RootCerts, TlsMode};
use super::QuicError;

/// The crypto provider every QUIC endpoint of this crate uses: rustls' `ring` provider, passed
/// explicitly, so no process depends on (or panics for want of) a process-wide default.
pub(super) fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The rustls client config for `config`: TLS 1.3, its trust mode and its ALPN list.
pub(super) fn client_config(config: &QuicConfig) -> Result<rustls::ClientConfig, QuicError> {
    let provider = provider();
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| QuicError::Tls(e.to_string()))?;
    let mut tls = match &config.tls {
        TlsMode::Verify { roots } => builder
            .with_root_certificates(root_store(roots)?)
            .with_no_client_auth(),
        TlsMode::DangerousAcceptAnyCertificate => {
            warn!(
                server = %config.server_addr,
                server_name = %config.server_name,
                "TLS certificate verification is DISABLED for this broker \
                 (TlsMode::DangerousAcceptAnyCertificate): any peer on the path can impersonate it"
            );
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AcceptAnyCertificate(provider)))
                .with_no_client_auth()
        }
    };
    tls.alpn_protocols.clone_from(&config.alpn);
    Ok(tls)
}

fn root_store(roots: &RootCerts) -> Result<RootCertStore, QuicError> {
    match roots {
        RootCerts::WebPki => Ok(RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        }),
        RootCerts::Certificates(certificates) => {
            let mut store = RootCertStore::empty();
            for der in certificates {
                store
                    .add(CertificateDer::from(der.clone()))
                    .map_err(|e| QuicError::InvalidCertificate(e.to_string()))?;
            }
            if store.is_empty() {
                return Err(QuicError::InvalidCertificate(
                    "RootCerts::Certificates is empty: nothing could ever be trusted".to_owned(),
                ));
            }
            Ok(store)
        }
    }
}

/// Accepts any certificate, but still checks that the handshake was signed by the key of the
/// certificate shown (see [`TlsMode::DangerousAcceptAnyCertificate`]).
#[derive(Debug)]
struct AcceptAnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AcceptAnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
