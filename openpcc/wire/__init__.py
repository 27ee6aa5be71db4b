"""Wire formats: QUIC varints, Binary HTTP, HPKE suites, OHTTP and chunked OHTTP."""
