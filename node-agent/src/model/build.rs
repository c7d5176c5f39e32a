//! Builds the per-family [`ProxyState`](super::ProxyState) from Services, EndpointSlices and the Node.
