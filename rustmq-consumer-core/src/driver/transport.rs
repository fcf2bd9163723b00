//! How the driver reaches a broker.

use std::sync::Arc;

use async_trait::async_trait;

use crate::error::TransportError;
use crate::protocol::{Request, Response};

/// Sends one request to the broker and returns its answer.
///
/// Takes `&self`: the driver keeps several requests in flight at once on one transport (one
/// QUIC stream each on the real broker), polling their futures from its single task.
#[async_trait]
pub trait Transport: Send + Sync + 'static {
    /// Sends `request` and waits for its response (or the reason there is none).
    async fn request(&self, request: Request) -> Result<Response, TransportError>;
}

#[async_trait]
impl<T: Transport + ?Sized> Transport for Arc<T> {
    async fn request(&self, request: Request) -> Result<Response, TransportError> {
        (**self).request(request).await
    }
}
