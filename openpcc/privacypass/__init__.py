"""Privacy Pass: RFC 9474 blind RSA, RFC 9577 auth scheme, RFC 9578 issuance."""
