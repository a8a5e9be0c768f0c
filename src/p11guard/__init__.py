"""p11guard: a PKCS#11 proxy with a security filter."""

__version__ = "0.1.0"
