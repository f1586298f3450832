"""Intel SGX / TDX DCAP quote verification with ``dcap-qvl``.

``dcap_qvl.verify`` checks the quote signature, the PCK certificate chain up to Intel's root CA,
the CRLs, the QE identity and the TCB info at the given time, and returns the TCB status. This
module turns its result into a :class:`~shieldtune.tee.attestation.Quote`.
"""

from __future__ import annotations

import json
from typing import Any

from shieldtune.errors import AttestationError
from shieldtune.tee.evidence import Evidence, Quote

__all__ = ["verify_dcap", "SGX_DEBUG_BIT", "TDX_DEBUG_BIT"]

#: SGX ATTRIBUTES.FLAGS bit 1 (DEBUG) in the first attribute byte.
SGX_DEBUG_BIT = 0x02
#: TDX TD_ATTRIBUTES bit 0 (TUD.DEBUG) in the first attribute byte.
TDX_DEBUG_BIT = 0x01


def _dcap() -> Any:
    try:
        import dcap_qvl
    except ImportError:
        raise AttestationError(
            "verifying SGX/TDX quotes needs the dcap-qvl package: pip install dcap-qvl==0.7.0"
        ) from None
    return dcap_qvl


def verify_dcap(evidence: Evidence, now_s: int) -> Quote:
    """Verify an SGX or TDX DCAP quote with its collateral at ``now_s``.

    Args:
        evidence: :class:`~shieldtune.tee.attestation.Evidence` of kind ``sgx-dcap`` or
            ``tdx-dcap`` with ``collateral`` set.
        now_s: Verification time, seconds since the epoch (must lie in the collateral window).

    Returns:
        The authenticated :class:`~shieldtune.tee.attestation.Quote` (policy not yet applied).

    Raises:
        AttestationError: Missing collateral, invalid signature, expired or revoked collateral,
            or a quote of the other TEE type.
    """
    dcap_qvl = _dcap()
    if not evidence.collateral:
        raise AttestationError(
            f"{evidence.kind} evidence has no collateral; fetch it from a PCCS "
            "(dcap_qvl.get_collateral) and attach it"
        )
    try:
        collateral = dcap_qvl.QuoteCollateralV3.from_json(evidence.collateral)
    except (ValueError, TypeError) as err:
        raise AttestationError(f"{evidence.kind} collateral is malformed: {err}") from None
    try:
        verified = dcap_qvl.verify(evidence.quote, collateral, int(now_s))
    except (ValueError, TypeError, RuntimeError) as err:
        raise AttestationError(
            f"{evidence.kind} quote refused by DCAP verification: {err}"
        ) from None
    result = json.loads(verified.to_json())
    report = result["report"]
    if evidence.kind == "sgx-dcap":
        if "SgxEnclave" not in report:
            raise AttestationError(f"evidence says sgx-dcap but the quote holds {list(report)}")
        body = report["SgxEnclave"]
        measurement = body["mr_enclave"]
        debug = bool(bytes.fromhex(body["attributes"])[0] & SGX_DEBUG_BIT)
        details = {k: str(body[k]) for k in ("mr_signer", "isv_prod_id", "isv_svn", "attributes")}
    else:
        td_key = next((k for k in report if k.startswith("TD")), None)
        if td_key is None:
            raise AttestationError(f"evidence says tdx-dcap but the quote holds {list(report)}")
        body = report[td_key]
        measurement = body["mr_td"]
        debug = bool(bytes.fromhex(body["td_attributes"])[0] & TDX_DEBUG_BIT)
        keys = (
            "rt_mr0",
            "rt_mr1",
            "rt_mr2",
            "rt_mr3",
            "mr_config_id",
            "mr_owner",
            "td_attributes",
            "xfam",
            "mr_seam",
        )
        details = {k: str(body[k]) for k in keys if k in body}
    return Quote(
        kind=evidence.kind,
        measurement=measurement.lower(),
        report_data=bytes.fromhex(body["report_data"]),
        debug=debug,
        simulated=False,
        tcb_status=str(result["status"]),
        advisory_ids=tuple(result.get("advisory_ids", [])),
        details=details,
    )
