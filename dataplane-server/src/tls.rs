//! TLS for data-plane connections (rustls): server and client configuration from PEM files,
//! the transports the server and the client speak through, and certificate generation for
//! `deltavol-dataplane tls init`.
