"""sevhook: attested launch of AMD SEV guests on libvirt."""

__version__ = "0.1.0"
