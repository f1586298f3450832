"""Method 1: TEE-shielded adapters with exact one-time-pad offload of frozen linear maps.

See ../shared/DESIGN.md §2 (Method 1) and README "Method 1".
"""
