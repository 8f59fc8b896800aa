"""Wire formats and cryptography of the SEV key-management protocol, one module per format."""
