"""Deployment packages (``.ppk``), the public API in one import for the host side.

The code lives in agent.manifest (schema, limits, reasons, policy checks), agent.keys (keys,
trust, revocation, version counter), agent.writer (``write_package``) and agent.verifier
(``verify_package``). This facade stays because deploy/ and pruning/ call it from ~10 places;
agent/ and the tests import the modules themselves.
"""

from __future__ import annotations

from prune_pack.agent.keys import (  # noqa: F401
    check_signature,
    default_key_path,
    default_pub_path,
    ensure_default_key,
    generate_keypair,
    key_id,
    load_private_key,
    load_public_key,
    next_version,
    record_version,
)
from prune_pack.agent.manifest import (  # noqa: F401
    MANIFEST_SCHEMA,
    MAX_MANIFEST_BYTES,
    REASONS,
    MiB,
    check_newer,
    check_validated,
    read_manifest,
    sha256_file,
)
from prune_pack.agent.verifier import VerifiedPackage, verify_package  # noqa: F401
from prune_pack.agent.writer import write_package  # noqa: F401
