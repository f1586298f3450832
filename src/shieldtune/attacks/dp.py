"""The differential-privacy option of a client update (clip its L2 norm, add Gaussian noise).

It lives in :mod:`shieldtune.federated.dp` (the federated modes use it); the attacks measure
against the same functions and import them from there.
"""

from __future__ import annotations

from shieldtune.federated.dp import dp_noise, privatize

__all__ = ["dp_noise", "privatize"]
