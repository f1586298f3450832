"""Pure cryptographic building blocks: tensor framing and the attested channel.

Everything here is a small pure function (or a small session object holding counters): bytes or
tensors in, bytes or tensors out, no I/O and no global state. Keys and nonces come only from the
operating system's CSPRNG (``os.urandom`` / ``cryptography``).
"""

__all__: list[str] = []
