"""The fixed sizes of SEV's wire structures, declared once. A module of its own, without cryptography,
so the XML checks and the hook's hot path can use them without loading the certificate code."""

from __future__ import annotations

SEV_CERT_SIZE = 0x824  # `sev_cert`, 2084 bytes: PDH, PEK, OCA, CEK and a guest owner's GODH
CERT_CHAIN_SIZE = 3 * SEV_CERT_SIZE  # PEK || OCA || CEK, QEMU's query-sev-capabilities "cert-chain"
PACKET_HEADER_SIZE = 52  # `sev_hdr_buf`: flags (4) || IV (16) || MAC (32), sev-inject-launch-secret's packet-header
