"""What a run writes and ships, signed or encrypted: the bundle, the content-addressed bases, signatures and
encryption, and the TLS / node-auth certificates."""
